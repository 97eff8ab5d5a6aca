"""Plain fine-tuning: per sample λ(σ)·mean‖D(x0 + σn; σ) − x0‖², the target x0 (EDM paper, Eq. 2 with λ)."""

from __future__ import annotations

import torch
from torch import nn

from ..engine.metrics import SigmaBinnedLoss
from ..models.edm_denoiser import Conditioning, EDMLoss
from .schedule import NoiseSchedule


class Denoising(nn.Module):
    """σ and n drawn here, so each objective decides what shares them (DPO: a pair shares both)."""

    name = "denoising"

    def __init__(self, unet: nn.Module, schedule: NoiseSchedule, device: torch.device):
        super().__init__()
        self.schedule = schedule
        self.loss = EDMLoss(schedule.denoiser(unet), schedule.weighting)
        self.by_sigma = SigmaBinnedLoss(device)

    def forward(self, x0: torch.Tensor, cond: Conditioning, generator: torch.Generator,
                loss_weights: torch.Tensor | None = None) -> torch.Tensor:
        """Per-sample losses of a batch of latents x0 and their conditioning (weighted per pixel with a masked loss)."""
        sigma = self.schedule.sigma_sampler(len(x0), generator, x0.device)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device)
        per_sample = self.loss(x0, sigma, noise, cond, loss_weights)
        self.by_sigma.add(sigma, per_sample)
        return per_sample

    def commit(self, keep: bool) -> None:
        """End of an update: count its statistics unless the update was skipped."""
        self.by_sigma.commit(keep)

    def metrics(self) -> dict[str, float]:
        """Means over all ranks since the last call (a collective)."""
        return self.by_sigma.means()

    def describe(self) -> str:
        return f"objective denoising; {self.schedule.describe()}"

