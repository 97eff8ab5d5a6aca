"""Preference alignment: Diffusion-DPO (Wallace et al. 2023) written in EDM's terms.

For a pair (winner x0ʷ, loser x0ˡ) with one caption, one σ and one noise n are shared by both images,
and each image's weighted denoising error is measured for the policy θ (the model being trained) and
for a frozen reference:

    Δ(x0) = λ(σ)·mean‖D(x0 + σn; σ) − x0‖²                      (over C, H, W)
    loss  = −log sigmoid(−β/2 · [(Δθʷ − Δrefʷ) − (Δθˡ − Δrefˡ)])  (per pair, then the batch mean)

The policy is pushed to denoise the winner better, relative to the reference, than the loser; the
reference term keeps it from drifting where the pair says nothing.

The equivalence with the paper: the implied noise is ε̂ = (x − D)/σ, so D − x0 = σ(n − ε̂) and, with
λ = 1/σ² (`loss_weighting='epsilon'`), Δ = mean‖ε̂ − n‖², exactly Diffusion-DPO's ε-MSE: its β (5000 for
SDXL) carries over. EDM's λ = 1/σ² + 1/σ_d² adds a constant 1/σ_d² = 4 to it, which weights high σ
(composition, colour) far more than ε-MSE does; β must then be set on that scale (docs/experiments).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from ..engine.metrics import RunningMeans, SigmaBinnedLoss
from ..models.edm_denoiser import Conditioning, EDMDenoiser, weighted_error
from .schedule import NoiseSchedule


class Reference:
    """The frozen reference model's denoiser, run without gradients.

    Deliberately not an `nn.Module` attribute of the objective: DDP would otherwise broadcast its
    weights at start-up and FSDP or `.to()` would treat it as part of what trains.
    """

    def __init__(self, denoiser: EDMDenoiser, adapters_off: bool):
        self.denoiser, self.adapters_off = denoiser, adapters_off

    @contextlib.contextmanager
    def _active(self):
        if not self.adapters_off:
            yield
            return
        unet = self.denoiser.unet  # the policy's own UNet: with its LoRA switched off it is the base model
        unet.disable_adapters()
        try:
            yield
        finally:
            unet.enable_adapters()

    def errors(self, x0: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor, cond: Conditioning, weighting: str) -> torch.Tensor:
        with torch.no_grad(), self._active():
            return weighted_error(self.denoiser, x0, sigma, noise, cond, weighting)


def frozen_copy(unet: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of the UNet as it is now (the base weights, before any training or resume), frozen."""
    import copy

    reference = copy.deepcopy(unet).requires_grad_(False).eval()
    return reference if reference.dtype == dtype else reference.to(dtype)


def dpo_loss(policy_w, policy_l, reference_w, reference_l, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair loss and the implicit reward margin −β/2·[(Δθʷ − Δrefʷ) − (Δθˡ − Δrefˡ)] (> 0: winner preferred)."""
    margin = -0.5 * beta * ((policy_w - reference_w) - (policy_l - reference_l))
    return -F.logsigmoid(margin), margin


class DPO(nn.Module):
    """Batches hold 2B images: the B winners, then their B losers, each with its own micro-conditioning."""

    name = "dpo"

    def __init__(self, unet: nn.Module, reference: Reference, schedule: NoiseSchedule, beta: float, weighting: str,
                 device: torch.device):
        super().__init__()
        self.schedule, self.reference = schedule, reference
        self.denoiser = schedule.denoiser(unet)
        self.beta, self.weighting = float(beta), weighting
        self.pairs = RunningMeans(["dpo/implicit_accuracy", "dpo/reward_margin", "dpo/policy_error_gap",
                                   "dpo/reference_error_gap"], device)
        self.policy_by_sigma = SigmaBinnedLoss(device, name="dpo/policy_error_sigma")
        self.reference_by_sigma = SigmaBinnedLoss(device, name="dpo/reference_error_sigma")

    def forward(self, x0: torch.Tensor, cond: Conditioning, generator: torch.Generator) -> torch.Tensor:
        """Per-pair losses."""
        pairs = len(x0) // 2
        sigma = self.schedule.sigma_sampler(pairs, generator, x0.device)
        noise = torch.randn((pairs, *x0.shape[1:]), generator=generator, device=x0.device)
        sigma, noise = sigma.repeat(2), noise.repeat(2, 1, 1, 1)  # the same σ and n for both images of a pair
        policy = weighted_error(self.denoiser, x0, sigma, noise, cond, self.weighting)  # one UNet call for all 2B
        reference = self.reference.errors(x0, sigma, noise, cond, self.weighting)
        (policy_w, policy_l), (reference_w, reference_l) = policy.chunk(2), reference.chunk(2)
        loss, margin = dpo_loss(policy_w, policy_l, reference_w, reference_l, self.beta)
        self.pairs.add(**{
            "dpo/implicit_accuracy": (margin > 0).float() + 0.5 * (margin == 0).float(),  # a tie counts ½
            "dpo/reward_margin": margin,
            "dpo/policy_error_gap": policy_w - policy_l,  # < 0: the policy denoises winners better
            "dpo/reference_error_gap": reference_w - reference_l,
        })
        self.policy_by_sigma.add(sigma, policy)
        self.reference_by_sigma.add(sigma, reference)
        return loss

    def commit(self, keep: bool) -> None:
        for window in (self.pairs, self.policy_by_sigma, self.reference_by_sigma):
            window.commit(keep)

    def metrics(self) -> dict[str, float]:
        return {**self.pairs.means(), **self.policy_by_sigma.means(), **self.reference_by_sigma.means()}

    def describe(self) -> str:
        reference = "the UNet with its LoRA off" if self.reference.adapters_off else "a frozen copy of the base UNet"
        return (f"objective DPO (β {self.beta:g}, λ {self.weighting}, reference {reference}); σ sampler "
                f"{type(self.schedule.sigma_sampler).__name__}")
