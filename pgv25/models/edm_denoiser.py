"""The UNet wrapped as an EDM denoiser D(x; σ) and its training loss."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import edm


@dataclass
class Conditioning:
    """What the SDXL UNet takes besides the noisy latents."""

    prompt_embeds: torch.Tensor  # (B, 77, d1 + d2)
    pooled_prompt_embeds: torch.Tensor  # (B, d2_proj)
    time_ids: torch.Tensor  # (B, 6): original (h, w), crop top-left (y, x), target (h, w)


class EDMDenoiser(nn.Module):
    """D(x; σ) = c_skip·x + c_out·F(c_in·x; c_noise, cond), with F the UNet (Karras et al., Eq. 7)."""

    def __init__(self, unet: nn.Module, sigma_data: float = 0.5, prediction_type: str = "epsilon", precondition=None):
        """`precondition`: σ → Preconditioning; default EDM's (Table 1); `ddpm.VPPreconditioning()` for DDPM."""
        super().__init__()
        self.unet = unet
        self.sigma_data = sigma_data
        self.prediction_type = prediction_type
        self.precondition = precondition or (lambda sigma: edm.preconditioning(sigma, self.sigma_data, self.prediction_type))

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        c = self.precondition(sigma)
        F = self.unet(
            (c.c_in * x).to(self.unet.dtype),
            c.c_noise,
            encoder_hidden_states=cond.prompt_embeds,
            added_cond_kwargs={"text_embeds": cond.pooled_prompt_embeds, "time_ids": cond.time_ids},
        ).sample
        return c.c_skip * x + c.c_out * F.float()  # the skip path stays fp32 under autocast


class EDMLoss(nn.Module):
    """Per-sample λ(σ)·‖D(x0 + σn; σ) − x0‖² (mean over latent elements): the target is x0.

    A module of its own so that DDP/FSDP wrap the whole training forward, and a `forward` so
    that their gradient hooks run.
    """

    def __init__(self, denoiser: EDMDenoiser, weighting: str = "none"):
        super().__init__()
        edm.loss_weight(torch.ones(1), denoiser.sigma_data, weighting)  # an unknown name fails here, not at step 1
        self.denoiser, self.weighting = denoiser, weighting

    def forward(self, x0: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor, cond: Conditioning,
                loss_weights: torch.Tensor | None = None) -> torch.Tensor:
        return weighted_error(self.denoiser, x0, sigma, noise, cond, self.weighting, loss_weights)


def weighted_error(denoiser: EDMDenoiser, x0: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor, cond: Conditioning,
                   weighting: str, loss_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Per sample λ(σ)·mean‖D(x0 + σn; σ) − x0‖² over (C, H, W): what every objective is built from.

    `loss_weights` ([B, 1, H, W] at pixel or latent resolution; masked loss, data/masks.py) weigh each latent
    pixel: averaged over the patch it covers, then mean(w·‖D − x0‖²) over the same elements."""
    D = denoiser(edm.add_noise(x0, sigma, noise), sigma, cond)
    error = (D - x0) ** 2
    if loss_weights is not None:
        error = error * latent_weights(loss_weights, x0.shape[-2:])
    return edm.loss_weight(sigma, denoiser.sigma_data, weighting) * error.flatten(1).mean(1)


def latent_weights(loss_weights: torch.Tensor, size) -> torch.Tensor:
    """Per-pixel weights [B, 1, H, W] → the latent's [B, 1, h, w], each the mean over its patch (exact for buckets,
    whose sides are multiples of the VAE's factor); a no-op for weights the latent cache stored at latent size."""
    loss_weights = loss_weights.float()
    if tuple(loss_weights.shape[-2:]) == tuple(size):
        return loss_weights
    return torch.nn.functional.interpolate(loss_weights, size=tuple(size), mode="area")
