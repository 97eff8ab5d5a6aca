"""DreamBooth's prior preservation: the denoising loss on the instance images plus `prior_loss_weight` times the
denoising loss on the class images drawn by the base model (Ruiz et al. 2023, Eq. 2), both in every step.

A batch holds both kinds, each sample flagged (`batch["prior"]`: True for a class image). The losses are
means over each kind, so the step minimises mean_instance + w · mean_class, as diffusers'
`train_dreambooth_lora_sdxl.py --with_prior_preservation` does; an image that failed to load only
shrinks its kind's count.
"""

from __future__ import annotations

import torch
from torch import nn

from ..engine.metrics import RunningMeans
from ..models.edm_denoiser import Conditioning
from .denoising import Denoising


class PriorPreservation(nn.Module):
    name = "prior_preservation"

    def __init__(self, denoising: Denoising, prior_loss_weight: float, device: torch.device):
        super().__init__()
        self.denoising, self.prior_loss_weight = denoising, prior_loss_weight
        self.parts = RunningMeans(["loss_instance", "loss_prior"], device)

    @staticmethod
    def batch_inputs(batch: dict, device: torch.device) -> dict:
        """What the step reads from the batch beside x0 and its conditioning: which samples are class images, and
        how many (counted on the host, so the step needs no device sync for it)."""
        prior = batch["prior"].to(torch.bool)
        return {"prior": prior.to(device, non_blocking=True), "n_prior": int(prior.sum())}

    def forward(self, x0: torch.Tensor, cond: Conditioning, generator: torch.Generator, prior: torch.Tensor,
                n_prior: int) -> torch.Tensor:
        """Per-sample losses, weighted so that their mean is mean_instance + w · mean_class."""
        per_sample = self.denoising(x0, cond, generator)
        n = len(per_sample)
        n_instance = n - n_prior
        weights = torch.where(prior, self.prior_loss_weight * n / max(n_prior, 1), n / max(n_instance, 1))
        self.parts.add(loss_instance=per_sample[~prior], loss_prior=per_sample[prior])
        return per_sample * weights.to(per_sample.dtype)

    def commit(self, keep: bool) -> None:
        self.denoising.commit(keep)
        self.parts.commit(keep)

    def metrics(self) -> dict[str, float]:
        return {**self.denoising.metrics(), **self.parts.means()}

    def describe(self) -> str:
        return f"{self.denoising.describe()}; prior preservation (class loss × {self.prior_loss_weight:g})"
