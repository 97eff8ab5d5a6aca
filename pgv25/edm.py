"""EDM preconditioning, σ sampling and loss weighting (Karras et al. 2022, "Elucidating the
Design Space of Diffusion-Based Generative Models"), with the paper's names.

Pure tensor math: no I/O and no diffusers objects, so every formula can be checked against the
paper and against diffusers' `EDMEulerScheduler` in the tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclass(frozen=True)
class Preconditioning:
    """Table 1 of the paper: D(x; σ) = c_skip·x + c_out·F(c_in·x; c_noise)."""

    c_in: torch.Tensor
    c_noise: torch.Tensor
    c_skip: torch.Tensor
    c_out: torch.Tensor


def c_in(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """Input scale 1/sqrt(σ²+σ_d²): the network sees unit-variance inputs at every σ."""
    return 1.0 / torch.sqrt(sigma**2 + sigma_data**2)


def c_noise(sigma: torch.Tensor) -> torch.Tensor:
    """Noise conditioning ¼·ln σ: what Playground's UNet receives as its "timestep"."""
    return 0.25 * torch.log(sigma)


def c_skip(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """Skip scale σ_d²/(σ²+σ_d²)."""
    return sigma_data**2 / (sigma**2 + sigma_data**2)


def c_out(sigma: torch.Tensor, sigma_data: float, prediction_type: str = "epsilon") -> torch.Tensor:
    """Output scale σ·σ_d/sqrt(σ²+σ_d²); negated for v-prediction, as diffusers' EDM schedulers do."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    scale = sigma * sigma_data / torch.sqrt(sigma**2 + sigma_data**2)
    return scale if prediction_type == "epsilon" else -scale


def preconditioning(sigma: torch.Tensor, sigma_data: float, prediction_type: str = "epsilon") -> Preconditioning:
    """All four coefficients for a batch of σ, shaped (B, 1, 1, 1) to broadcast over latents
    (c_noise stays (B,): it is the UNet's timestep argument)."""
    s = sigma.reshape(-1, 1, 1, 1)
    return Preconditioning(
        c_in=c_in(s, sigma_data),
        c_noise=c_noise(sigma.reshape(-1)),
        c_skip=c_skip(s, sigma_data),
        c_out=c_out(s, sigma_data, prediction_type),
    )


def karras_sigmas(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """Eq. 5: σ_i = (σ_max^(1/ρ) + i/(n-1)·(σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ, from σ_max down to σ_min."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    max_inv_rho, min_inv_rho = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return ((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho).float()


class KarrasIndexSampler:
    """σ drawn uniformly over the scheduler's n-step Karras grid (median σ ≈ 2.5 for Playground).

    This is what diffusers' `--do_edm_style_training` and sdxlengine's Playground recipe do.
    """

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0, num_train_timesteps: int = 1000):
        # diffusers' EDM schedulers build the training grid on the ramp i/N, i = 0..N (N+1 points), and
        # the public training path draws i uniformly in [0, N): the same grid, the same draw here.
        self.sigmas = karras_sigmas(num_train_timesteps + 1, sigma_min, sigma_max, rho)[:num_train_timesteps]

    def __call__(self, batch_size: int, generator: torch.Generator, device: torch.device | str = "cpu") -> torch.Tensor:
        index = torch.randint(0, len(self.sigmas), (batch_size,), generator=generator, device=generator.device)
        return self.sigmas.to(index.device)[index].to(device)


class LogNormalSampler:
    """ln σ ~ N(P_mean, P_std²), the EDM paper's training distribution (Table 1)."""

    def __init__(self, P_mean: float = -1.2, P_std: float = 1.2):  # paper defaults
        self.P_mean, self.P_std = P_mean, P_std

    def __call__(self, batch_size: int, generator: torch.Generator, device: torch.device | str = "cpu") -> torch.Tensor:
        ln_sigma = torch.randn(batch_size, generator=generator, device=generator.device) * self.P_std + self.P_mean
        return ln_sigma.exp().to(device)


def build_sigma_sampler(kind: str, scheduler_config: dict, **kwargs):
    """`karras_index` reads the grid from the scheduler config; `lognormal` takes P_mean/P_std."""
    if kind == "karras_index":
        return KarrasIndexSampler(
            sigma_min=scheduler_config.get("sigma_min", 0.002),
            sigma_max=scheduler_config.get("sigma_max", 80.0),
            rho=scheduler_config.get("rho", 7.0),
            num_train_timesteps=scheduler_config.get("num_train_timesteps", 1000),
        )
    if kind == "lognormal":
        return LogNormalSampler(**kwargs)
    raise ValueError(f"unknown sigma sampler {kind!r}; choose 'karras_index' or 'lognormal'")


def loss_weight(sigma: torch.Tensor, sigma_data: float, weighting: str = "none") -> torch.Tensor:
    """`none`: 1 (the public Playground path); `edm`: λ(σ) = (σ²+σ_d²)/(σ·σ_d)², which makes the
    effective target of F unit-variance at every σ (paper, Sec. 5); `epsilon`: 1/σ², DDPM's ε-MSE
    ‖ε̂ − ε‖² written on x0 (ddpm.py)."""
    if weighting == "none":
        return torch.ones_like(sigma)
    if weighting == "edm":
        return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
    if weighting == "epsilon":
        return sigma**-2.0
    raise ValueError(f"unknown loss weighting {weighting!r}; choose 'none', 'edm' or 'epsilon'")


def add_noise(x0: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x = x0 + σ·n: EDM's forward process (no signal scaling, unlike DDPM)."""
    return x0 + sigma.reshape(-1, 1, 1, 1) * noise


def median_sigma(sampler, n: int = 100_000, seed: int = 0) -> float:
    """Median σ of a sampler, for logs and docs."""
    g = torch.Generator().manual_seed(seed)
    return float(sampler(n, g).median())

