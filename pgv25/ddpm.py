"""SDXL's DDPM noise schedule written in EDM's terms, for the noise-schedule comparison.

Karras et al. (2022, Table 1, the "VP" column) show that DDPM training is one choice of σ grid and
preconditioning: with ᾱ_t the cumulative product of 1 − β, x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·n equals
√ᾱ_t·(x0 + σ_t·n) with σ_t = √((1−ᾱ_t)/ᾱ_t). The UNet sees c_in·x = √ᾱ_t·x and the timestep t and
predicts n (ε), so D = x − σ·F (c_skip = 1, c_out = −σ), and the ε-MSE ‖F − n‖² is ‖D − x0‖²/σ²
(the `epsilon` loss weighting, λ = 1/σ²). One denoiser and one loss train both schedules; only
this file knows SDXL's numbers.

What Playground v2.5 changed: SDXL's last timestep keeps √ᾱ_999 ≈ 0.068 of the signal (σ_max ≈
14.6, a non-zero terminal SNR), so the model never learns to start from pure noise; sampling starts
there anyway and the image mean drifts to grey. EDM's σ_max = 80 leaves 0.6% of a unit signal.
"""

from __future__ import annotations

import torch

from .edm import Preconditioning

# SDXL's β schedule (stable-diffusion-xl-base-1.0's scheduler_config.json), sampled with DPM++ 2M like
# Playground's EDM sampler, so the two differ in the schedule only. `timestep_spacing="trailing"`
# starts sampling at t = 999 (SDXL ships "leading", whose first step is lower still), so what the
# comparison shows is the terminal SNR itself, not the spacing on top.
SDXL_SCHEDULER_CONFIG = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    prediction_type="epsilon",
    steps_offset=1,
    timestep_spacing="trailing",
    algorithm_type="dpmsolver++",
    solver_order=2,
)


def sdxl_sigmas(num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """σ_t for t = 0 … T−1 of the scaled-linear β schedule (β linear in √β), ascending."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    return ((1 - alphas_cumprod) / alphas_cumprod).sqrt().float()


class DDPMIndexSampler:
    """t uniform in [0, T), returned as σ_t: the DDPM training draw (diffusers' train_text_to_image_sdxl)."""

    def __init__(self, sigmas: torch.Tensor | None = None):
        self.sigmas = sdxl_sigmas() if sigmas is None else sigmas

    def __call__(self, batch_size: int, generator: torch.Generator, device: torch.device | str = "cpu") -> torch.Tensor:
        index = torch.randint(0, len(self.sigmas), (batch_size,), generator=generator, device=generator.device)
        return self.sigmas.to(index.device)[index].to(device)


class VPPreconditioning:
    """c_in = 1/√(σ²+1) = √ᾱ, c_skip = 1, c_out = −σ, c_noise = t (the DDPM timestep of σ)."""

    def __init__(self, sigmas: torch.Tensor | None = None):
        self.log_sigmas = (sdxl_sigmas() if sigmas is None else sigmas).log()

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """t of σ, interpolated linearly in log σ between grid points (exact on the grid)."""
        log_sigmas = self.log_sigmas.to(sigma.device)
        log_sigma = sigma.float().log().clamp(log_sigmas[0], log_sigmas[-1])
        high = torch.searchsorted(log_sigmas, log_sigma).clamp(1, len(log_sigmas) - 1)
        low = high - 1
        w = (log_sigma - log_sigmas[low]) / (log_sigmas[high] - log_sigmas[low])
        return low.float() + w

    def __call__(self, sigma: torch.Tensor) -> Preconditioning:
        s = sigma.reshape(-1, 1, 1, 1)
        return Preconditioning(
            c_in=1.0 / torch.sqrt(s**2 + 1.0), c_noise=self.timestep(sigma.reshape(-1)), c_skip=torch.ones_like(s), c_out=-s,
        )


def sdxl_scheduler():
    """The sampler a DDPM-schedule export ships: DPM++ 2M on SDXL's β schedule (`--scheduler native`)."""
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(**SDXL_SCHEDULER_CONFIG)
