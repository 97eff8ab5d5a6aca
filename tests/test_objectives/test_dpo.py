"""The DPO objective against Diffusion-DPO's ε-form, and its reference models."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pgv25 import edm
from pgv25.models.edm_denoiser import Conditioning
from pgv25.objectives.dpo import DPO, Reference, frozen_copy
from pgv25.objectives.schedule import NoiseSchedule


class ToyUNet(nn.Module):
    """Stands in for the SDXL UNet: a convolution whose output depends on the input, σ and the conditioning."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    @property
    def dtype(self):
        return self.conv.weight.dtype

    def forward(self, x, c_noise, encoder_hidden_states, added_cond_kwargs):
        shift = encoder_hidden_states.mean((1, 2)) + added_cond_kwargs["time_ids"].mean(1) / 100 + c_noise
        return type("Out", (), {"sample": self.conv(x) + shift.reshape(-1, 1, 1, 1)})


def schedule() -> NoiseSchedule:
    return NoiseSchedule(edm.LogNormalSampler(-1.2, 1.2), "epsilon", 0.5, "epsilon")


def pair_batch(pairs: int):
    torch.manual_seed(1)
    x0 = torch.randn(2 * pairs, 4, 8, 8)
    embeds = torch.randn(pairs, 5, 6).repeat(2, 1, 1)  # one caption per pair
    cond = Conditioning(embeds, torch.randn(pairs, 3).repeat(2, 1), torch.rand(2 * pairs, 6) * 64)
    return x0, cond


def epsilon_form_dpo(policy: nn.Module, reference: nn.Module, x0, cond, sigma, noise, beta):
    """Diffusion-DPO as Wallace et al. write it: the ε-MSE of winners and losers for policy and reference,
    loss = −log σ(−β/2·[(mseθʷ − mseθˡ) − (mseRʷ − mseRˡ)]), with ε̂ = (x − D)/σ under EDM preconditioning."""
    x = x0 + sigma.reshape(-1, 1, 1, 1) * noise
    c = edm.preconditioning(sigma, 0.5, "epsilon")

    def mse(unet):
        D = c.c_skip * x + c.c_out * unet(c.c_in * x, c.c_noise, cond.prompt_embeds,
                                         {"text_embeds": cond.pooled_prompt_embeds, "time_ids": cond.time_ids}).sample
        eps = (x - D) / sigma.reshape(-1, 1, 1, 1)
        return ((eps - noise) ** 2).mean((1, 2, 3))

    model_w, model_l = mse(policy).chunk(2)
    with torch.no_grad():
        ref_w, ref_l = mse(reference).chunk(2)
    return -F.logsigmoid(-0.5 * beta * ((model_w - model_l) - (ref_w - ref_l)))


def test_loss_is_diffusion_dpo_with_shared_sigma_and_noise():
    pairs, beta = 3, 50.0
    policy, reference = ToyUNet(0), ToyUNet(1)
    sched = schedule()
    objective = DPO(policy, Reference(sched.denoiser(reference), adapters_off=False), sched, beta, "epsilon", torch.device("cpu"))
    x0, cond = pair_batch(pairs)
    loss = objective(x0, cond, torch.Generator().manual_seed(7))

    g = torch.Generator().manual_seed(7)  # the same draws: σ per pair, then n per pair, both repeated for the loser
    sigma = sched.sigma_sampler(pairs, g).repeat(2)
    noise = torch.randn((pairs, 4, 8, 8), generator=g).repeat(2, 1, 1, 1)
    expected = epsilon_form_dpo(policy, reference, x0, cond, sigma, noise, beta)
    # the same float32 quantities reached in another order (D − x0 vs ε̂ − n, divided by σ²)
    assert torch.allclose(loss, expected, rtol=1e-4, atol=1e-6), (loss, expected)
    loss.mean().backward()
    assert policy.conv.weight.grad is not None and reference.conv.weight.grad is None


def test_metrics_count_ties_as_half_and_report_the_margin():
    unet = ToyUNet(0)
    sched = schedule()
    objective = DPO(unet, Reference(sched.denoiser(unet), adapters_off=False), sched, 10.0, "epsilon", torch.device("cpu"))
    x0, cond = pair_batch(4)
    loss = objective(x0, cond, torch.Generator().manual_seed(0))  # policy == reference: every pair a tie
    objective.commit(keep=True)
    metrics = objective.metrics()
    assert torch.allclose(loss, torch.full((4,), torch.log(torch.tensor(2.0)).item()))
    assert metrics["dpo/implicit_accuracy"] == 0.5 and metrics["dpo/reward_margin"] == 0.0
    assert any(k.startswith("dpo/policy_error_sigma/") for k in metrics)
    objective(x0, cond, torch.Generator().manual_seed(0))
    objective.commit(keep=False)  # a skipped update leaves no trace
    assert objective.metrics() == {}


def test_loser_denoised_worse_than_the_reference_does_means_a_correct_preference():
    """A policy that denoises the winner better than the reference, and the loser no better, prefers the winner."""
    sched = schedule()

    class Oracle(nn.Module):  # F that makes D exact for the first half of the batch (winners), reference-like otherwise
        def __init__(self, x0, perfect: bool):
            super().__init__()
            self.x0, self.perfect, self.dtype = x0, perfect, torch.float32
            self.scale = nn.Parameter(torch.ones(()))

        def forward(self, x_in, c_noise, encoder_hidden_states, added_cond_kwargs):
            sigma = torch.exp(4 * c_noise).reshape(-1, 1, 1, 1)
            c = edm.preconditioning(sigma, 0.5, "epsilon")
            x = x_in / c.c_in
            exact = (self.x0 - c.c_skip * x) / c.c_out
            out = torch.zeros_like(x)
            if self.perfect:
                out[: len(x) // 2] = exact[: len(x) // 2]
            return type("Out", (), {"sample": out * self.scale})

    x0, cond = pair_batch(3)
    objective = DPO(Oracle(x0, True), Reference(sched.denoiser(Oracle(x0, False)), adapters_off=False), sched, 1.0,
                    "epsilon", torch.device("cpu"))
    loss = objective(x0, cond, torch.Generator().manual_seed(3))
    objective.commit(keep=True)
    assert objective.metrics()["dpo/implicit_accuracy"] == 1.0
    assert (loss < torch.log(torch.tensor(2.0))).all()


def test_frozen_copy_keeps_the_weights_of_its_moment():
    unet = ToyUNet(0)
    reference = frozen_copy(unet, torch.float32)
    with torch.no_grad():
        unet.conv.weight.add_(1.0)
    assert not torch.equal(reference.conv.weight, unet.conv.weight)
    assert not any(p.requires_grad for p in reference.parameters())


def test_adapters_off_reference_is_the_base_unet(tiny_pipeline):
    """With LoRA the reference is the policy's own UNet with its adapters off: the base model, no second copy."""
    import copy

    from pgv25.models.lora import add_lora

    base = copy.deepcopy(tiny_pipeline.unet).eval()
    unet = copy.deepcopy(tiny_pipeline.unet).eval()
    add_lora(unet, {"rank": 4})
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a trained adapter
    sched = NoiseSchedule(edm.LogNormalSampler(), "edm", 0.5, "epsilon")
    prompt_embeds, _, pooled, _ = tiny_pipeline.encode_prompt(["a red circle on a white background"] * 4, device="cpu")
    cond = Conditioning(prompt_embeds, pooled, torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * 4))
    x0 = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    sigma, noise = torch.full((4,), 1.5), torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    from pgv25.models.edm_denoiser import weighted_error

    reference = Reference(sched.denoiser(unet), adapters_off=True).errors(x0, sigma, noise, cond, "edm")
    with torch.no_grad():
        expected = weighted_error(sched.denoiser(base), x0, sigma, noise, cond, "edm")
        policy = weighted_error(sched.denoiser(unet), x0, sigma, noise, cond, "edm")
    assert torch.allclose(reference, expected, rtol=1e-5)
    assert not torch.allclose(policy, expected, rtol=1e-3)  # the adapters are back on afterwards


@pytest.mark.parametrize("change, message", [
    ({"objective.beta": 0}, "objective.beta must be a positive number"),
    ({"objective.beta": -5}, "objective.beta must be a positive number"),
    ({"objective.reference": "adapters_off"}, "needs model.lora.enabled=True"),
    ({"objective.reference": "ema"}, "objective.reference must be one of"),
    ({"objective.loss_weighting": "sqrt"}, "objective.loss_weighting must be"),
    ({"strategy": "fsdp"}, "strategy='fsdp' is not supported"),
    ({"model.lora.enabled": True, "model.lora.text_encoders": True}, "text_encoders=True is not supported"),
    ({"train_dataloader.dataset.pairs": None}, "trains on preference pairs"),
])
def test_dpo_config_mistakes_are_one_line_before_anything_loads(change, message):
    from pgv25.config import load_config
    from pgv25.errors import UserError
    from pgv25.objectives import objective_options

    cfg = load_config("playgroundv2_5_dpo_tiny_shapes", change)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")) as error:
        objective_options(cfg)
    assert "\n" not in str(error.value)


def test_pairs_without_dpo_and_an_unknown_objective_are_refused():
    from pgv25.config import load_config
    from pgv25.errors import UserError
    from pgv25.objectives import objective_options

    with pytest.raises(UserError, match="which objective.type='denoising' cannot use"):
        objective_options(load_config("playgroundv2_5_dpo_tiny_shapes", {"objective": {"type": "denoising"}}))
    with pytest.raises(UserError, match="objective.type must be one of"):
        objective_options(load_config("playgroundv2_5_tiny_shapes", {"objective.type": "ppo"}))
