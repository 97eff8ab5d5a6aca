"""The noise process a UNet is trained under (`model.noise_schedule`): how σ is drawn, how the UNet's
input and output are preconditioned into D(x; σ), how each σ's error is weighted, and which sampler an
export ships. Every objective is written in these terms, so DPO and prior preservation run under
Playground's EDM schedule (or SDXL's DDPM one, for comparison) without knowing which.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .. import ddpm, edm
from ..errors import UserError
from ..models.edm_denoiser import EDMDenoiser

logger = logging.getLogger("pgv25")


@dataclass
class NoiseSchedule:
    sigma_sampler: object  # (batch, generator, device) → σ
    weighting: str  # λ(σ): 'edm', 'none' or 'epsilon' (edm.loss_weight)
    sigma_data: float
    prediction_type: str
    precondition: object = None  # σ → Preconditioning; None: EDM's (Table 1)
    export_scheduler: object = None  # the scheduler exports must ship; None: the base pipeline's

    def denoiser(self, unet) -> EDMDenoiser:
        return EDMDenoiser(unet, self.sigma_data, self.prediction_type, self.precondition)

    def describe(self) -> str:
        return (f"σ sampler {type(self.sigma_sampler).__name__} (median σ {edm.median_sigma(self.sigma_sampler):.2f}), "
                f"loss weighting {self.weighting}")


def build_noise_schedule(model_cfg: dict, scheduler_config: dict, lora: bool) -> NoiseSchedule:
    """'edm' is Playground's; 'ddpm' is SDXL's, kept for the schedule comparison (docs/experiments)."""
    schedule = model_cfg.get("noise_schedule", "edm")
    if schedule == "edm":
        sampler_cfg = dict(model_cfg.get("sigma_sampler", {"type": "lognormal"}))
        try:
            sampler = edm.build_sigma_sampler(sampler_cfg.pop("type"), scheduler_config, **sampler_cfg)
            weighting = model_cfg.get("loss_weighting", "edm")
            edm.loss_weight(torch.ones(1), 0.5, weighting)  # an unknown name fails here, not at step 1
        except (TypeError, ValueError) as error:
            raise UserError(f"model: {error}") from None
        return NoiseSchedule(sampler, weighting, scheduler_config.get("sigma_data", 0.5),
                             scheduler_config.get("prediction_type", "epsilon"))
    if schedule != "ddpm":
        raise UserError(f"model.noise_schedule must be 'edm' (Playground v2.5) or 'ddpm' (SDXL's), got {schedule!r}")
    if lora:
        raise UserError("model.noise_schedule='ddpm' retrains the UNet for another schedule: use a full fine-tune, not LoRA")
    logger.info("noise schedule: SDXL's DDPM (scaled-linear β, ε-prediction, t uniform); "
                "model.sigma_sampler and model.loss_weighting do not apply; exports ship its DPM++ sampler")
    return NoiseSchedule(ddpm.DDPMIndexSampler(), "epsilon", 0.5, "epsilon", ddpm.VPPreconditioning(), ddpm.sdxl_scheduler())
