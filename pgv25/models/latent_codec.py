"""Pixels ↔ the latents the UNet is trained on, with Playground's per-channel normalisation."""

from __future__ import annotations

import torch
from torch import nn


class LatentCodec(nn.Module):
    """Frozen VAE plus normalisation: z_train = (z − mean)·scaling_factor/std.

    Playground's VAE config carries `latents_mean/std` and scaling_factor 0.5, which puts the
    training latents at σ_data = 0.5. A config without them means plain z·scaling_factor.
    Decoding inverts it exactly as `StableDiffusionXLPipeline` does before `vae.decode`.
    """

    def __init__(self, vae):
        super().__init__()
        self.vae = vae.requires_grad_(False).eval()
        config = vae.config
        self.scaling_factor = float(config.scaling_factor)
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        has_stats = mean is not None and std is not None
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1) if has_stats else torch.zeros(1, 1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1) if has_stats else torch.ones(1, 1, 1, 1), persistent=False)

    def train(self, mode: bool = True):
        return super().train(False)

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.mean.to(z)) * self.scaling_factor / self.std.to(z)

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        return latents * self.std.to(latents) / self.scaling_factor + self.mean.to(latents)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Pixels in [-1, 1] → normalised latents (a posterior sample, as SD training does)."""
        z = self.vae.encode(pixels.to(self.vae.device, self.vae.dtype)).latent_dist.sample(generator)
        return self.normalize(z.float())

    @torch.no_grad()
    def encode_mean(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels → normalised posterior means: what a latent cache stores (the posterior's spread is
        ~1% of the latents' for the SDXL VAE, so one mean stands for every sample)."""
        z = self.vae.encode(pixels.to(self.vae.device, self.vae.dtype)).latent_dist.mean
        return self.normalize(z.float())

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = self.denormalize(latents.float()).to(self.vae.dtype)
        return self.vae.decode(z).sample.float()
