"""SDXL's DDPM schedule in EDM's terms (pgv25/ddpm.py) agrees with diffusers' own DDPM arithmetic."""

import pytest
import torch

from pgv25 import ddpm, edm
from pgv25.models.edm_denoiser import Conditioning, EDMDenoiser, EDMLoss


def test_sigmas_are_sdxl_schedule():
    from diffusers import EulerDiscreteScheduler

    euler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    expected = torch.as_tensor(euler.sigmas[:-1]).flip(0).float()  # diffusers stores them descending, with a final 0
    assert torch.allclose(ddpm.sdxl_sigmas(), expected, rtol=1e-4)
    assert abs(float(ddpm.sdxl_sigmas()[-1]) - 14.6146) < 1e-3  # the non-zero terminal SNR: σ_max ≈ 14.6, not 80


def test_unet_input_is_ddpm_noisy_sample_and_timestep():
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([0, 421, 999])
    sigma = ddpm.sdxl_sigmas()[t]
    c = ddpm.VPPreconditioning()(sigma)
    assert torch.allclose(c.c_in * edm.add_noise(x0, sigma, noise), scheduler.add_noise(x0, noise, t), atol=1e-5)
    assert torch.allclose(c.c_noise, t.float(), atol=1e-3)


class Oracle(torch.nn.Module):
    """A "UNet" that returns the true noise: D must then be x0 and the ε-loss 0."""

    dtype = torch.float32

    def __init__(self, noise):
        super().__init__()
        self.noise = noise

    def forward(self, x, t, encoder_hidden_states=None, added_cond_kwargs=None):
        return type("Out", (), {"sample": self.noise})()


def test_epsilon_weighting_is_the_epsilon_mse():
    x0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    sigma = ddpm.sdxl_sigmas()[torch.tensor([10, 900])]
    cond = Conditioning(torch.zeros(2, 77, 8), torch.zeros(2, 8), torch.zeros(2, 6))
    guess = noise + 0.1 * torch.randn_like(noise)
    loss = EDMLoss(EDMDenoiser(Oracle(guess), precondition=ddpm.VPPreconditioning()), "epsilon")(x0, sigma, noise, cond)
    assert torch.allclose(loss, ((guess - noise) ** 2).flatten(1).mean(1), rtol=1e-4)
    exact = EDMDenoiser(Oracle(noise), precondition=ddpm.VPPreconditioning())(edm.add_noise(x0, sigma, noise), sigma, cond)
    assert torch.allclose(exact, x0, atol=1e-4)


def test_sampler_draws_the_grid_uniformly():
    sampler = ddpm.DDPMIndexSampler()
    sigma = sampler(20000, torch.Generator().manual_seed(0))
    grid = ddpm.sdxl_sigmas()
    assert torch.isin(sigma, grid).all()
    assert abs(float((sigma <= grid[499]).float().mean()) - 0.5) < 0.02


@pytest.mark.slow
def test_ddpm_schedule_trains_and_exports_its_own_sampler(tiny_assets, tmp_path):
    import json

    import pytest
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionXLPipeline

    from conftest import tiny_cfg
    from pgv25.engine.runner import Trainer, train
    from pgv25.errors import UserError

    options = ["model.noise_schedule=ddpm", "train_cfg.max_iters=2", "validation.interval=1", "sample_grid.steps=2"]
    result = train(tiny_cfg(tmp_path / "ddpm", *options))
    index = json.loads((result.step_dir / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", "DPMSolverMultistepScheduler"]
    assert (tmp_path / "ddpm" / "validation" / "iter_0000002.png").is_file()
    pipe = StableDiffusionXLPipeline.from_pretrained(result.step_dir)  # plain diffusers samples it on SDXL's schedule
    assert isinstance(pipe.scheduler, DPMSolverMultistepScheduler)
    assert pipe.scheduler.config.beta_schedule == "scaled_linear" and pipe.scheduler.config.timestep_spacing == "trailing"
    image = pipe("a red circle on a white background", num_inference_steps=2, output_type="np").images[0]
    assert image.shape == (64, 64, 3)
    # the base pipeline's own files are untouched: the EDM scheduler stays in the base folder
    assert json.loads((tiny_assets["model"] / "model_index.json").read_text())["scheduler"][1] == "EDMDPMSolverMultistepScheduler"
    with pytest.raises(UserError, match="full fine-tune, not LoRA"):
        Trainer(tiny_cfg(tmp_path / "lora", "model.noise_schedule=ddpm", "model.lora.enabled=True"))
    with pytest.raises(UserError, match="noise_schedule must be 'edm'"):
        Trainer(tiny_cfg(tmp_path / "bad", "model.noise_schedule=vp"))
