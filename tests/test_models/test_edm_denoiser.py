import torch
from diffusers import EDMDPMSolverMultistepScheduler

from pgv25 import edm
from pgv25.models.edm_denoiser import Conditioning, EDMDenoiser, EDMLoss


def conditioning(pipe, batch):
    prompt_embeds, _, pooled, _ = pipe.encode_prompt(["a red circle on a white background"] * batch, device="cpu")
    time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * batch)
    return Conditioning(prompt_embeds, pooled, time_ids)


def test_denoised_estimate_equals_the_pipeline_schedulers(tiny_pipeline):
    """D(x; σ) from a training forward == what EDMDPMSolverMultistepScheduler computes at inference."""
    unet = tiny_pipeline.unet.eval()
    scheduler = EDMDPMSolverMultistepScheduler.from_config(tiny_pipeline.scheduler.config)
    scheduler.set_timesteps(10)
    cond = conditioning(tiny_pipeline, 1)
    denoiser = EDMDenoiser(unet, scheduler.config.sigma_data, scheduler.config.prediction_type)
    torch.manual_seed(0)
    for i in (0, 4, 9):
        t, sigma = scheduler.timesteps[i], scheduler.sigmas[i]
        x = torch.randn(1, 4, 16, 16) * float(sigma)
        scheduler._step_index = i
        with torch.no_grad():
            model_input = scheduler.scale_model_input(x, t)
            F = unet(model_input, t, encoder_hidden_states=cond.prompt_embeds,
                     added_cond_kwargs={"text_embeds": cond.pooled_prompt_embeds, "time_ids": cond.time_ids}).sample
            expected = scheduler.convert_model_output(F, sample=x)
            ours = denoiser(x, sigma.reshape(1), cond)
        assert torch.allclose(t, edm.c_noise(sigma), rtol=1e-6)
        assert torch.allclose(ours, expected, atol=1e-5, rtol=1e-4), f"step {i}: max diff {(ours - expected).abs().max()}"


def test_loss_targets_x0_and_applies_weighting(tiny_pipeline):
    unet = tiny_pipeline.unet.eval()
    denoiser = EDMDenoiser(unet)
    cond = conditioning(tiny_pipeline, 2)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 16, 16, generator=g) * 0.5, torch.randn(2, 4, 16, 16, generator=g)
    sigma = torch.tensor([0.3, 5.0])
    with torch.no_grad():
        D = denoiser(x0 + sigma.view(-1, 1, 1, 1) * noise, sigma, cond)
        expected = ((D - x0) ** 2).flatten(1).mean(1)
        assert torch.allclose(EDMLoss(denoiser, "none")(x0, sigma, noise, cond), expected, rtol=1e-5)
        weighted = EDMLoss(denoiser, "edm")(x0, sigma, noise, cond)
    assert torch.allclose(weighted, expected * edm.loss_weight(sigma, 0.5, "edm"), rtol=1e-5)


def test_loss_is_differentiable_only_through_the_unet(tiny_pipeline):
    import copy

    unet = copy.deepcopy(tiny_pipeline.unet).train()
    loss_fn = EDMLoss(EDMDenoiser(unet))
    cond = conditioning(tiny_pipeline, 2)
    x0, noise = torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 16)
    loss_fn(x0, torch.tensor([1.0, 2.0]), noise, cond).mean().backward()
    assert all(p.grad is not None for p in unet.parameters() if p.requires_grad)


def test_masked_loss_weighs_each_latent_pixel_by_its_patch_mean(tiny_pipeline):
    """mean(w·‖D − x0‖²) with w the per-pixel weights averaged over each latent pixel's patch; weights of 1 change nothing."""
    denoiser = EDMDenoiser(tiny_pipeline.unet.eval())
    cond = conditioning(tiny_pipeline, 2)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 16, 16, generator=g) * 0.5, torch.randn(2, 4, 16, 16, generator=g)
    sigma = torch.tensor([0.3, 5.0])
    pixels = torch.zeros(2, 1, 64, 64)  # a VAE factor of 4: each latent pixel covers 4×4 pixels
    pixels[:, :, :, :32] = 1.0  # the left half counts
    pixels[:, :, :2, 32:36] = 1.0  # half of one latent pixel's patch on the right: weight 0.5 there
    loss = EDMLoss(denoiser, "none")
    with torch.no_grad():
        D = denoiser(x0 + sigma.view(-1, 1, 1, 1) * noise, sigma, cond)
        latent = torch.zeros(2, 1, 16, 16)
        latent[..., :8], latent[..., 0, 8] = 1.0, 0.5
        expected = (latent * (D - x0) ** 2).flatten(1).mean(1)
        assert torch.allclose(loss(x0, sigma, noise, cond, pixels), expected, rtol=1e-5)
        assert torch.allclose(loss(x0, sigma, noise, cond, latent.half()), expected, rtol=1e-3)  # as the latent cache stores them
        assert torch.equal(loss(x0, sigma, noise, cond, torch.ones(2, 1, 64, 64)), loss(x0, sigma, noise, cond))
