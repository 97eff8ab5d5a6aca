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
from ..errors import UserError
from ..models.edm_denoiser import Conditioning
from .denoising import Denoising


# objective keys of prior preservation (refused with any other objective type); generation: how class images are drawn
CLASS_KEYS = ("prior_loss_weight", "class_prompt", "class_data_dir", "num_class_images", "class_generation")
GENERATION = {"batch_size": 4, "steps": 25, "guidance_scale": 3.0, "negative_prompt": None, "seed": 0}


def prior_options(options: dict) -> dict:
    """objective.* of prior preservation, checked (one line each) before any data or model loads."""
    prompt = options.get("class_prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise UserError("objective.type='prior_preservation' needs objective.class_prompt, e.g. 'a photo of a dog' "
                        "(what the class looks like without the instance)")
    folder = options.get("class_data_dir")
    if not isinstance(folder, str) or not folder.strip():
        raise UserError("objective.class_data_dir must be a folder for the class images (kept and reused)")
    count = options.get("num_class_images", 100)
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise UserError(f"objective.num_class_images must be an integer ≥ 1, got {count!r}")
    weight = options.get("prior_loss_weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight < float("inf"):
        raise UserError(f"objective.prior_loss_weight must be a number ≥ 0, got {weight!r}")
    generation = dict(options.get("class_generation") or {})
    unknown = sorted(set(generation) - set(GENERATION))
    if unknown:
        raise UserError(f"objective.class_generation.{unknown[0]} is not a setting; use {', '.join(GENERATION)}")
    return {"class_prompt": prompt, "class_data_dir": folder, "num_class_images": count, "prior_loss_weight": float(weight),
            "class_generation": {**GENERATION, **generation}}


class PriorPreservation(nn.Module):
    name = "prior_preservation"

    def __init__(self, denoising: Denoising, prior_loss_weight: float, device: torch.device):
        super().__init__()
        self.denoising, self.prior_loss_weight = denoising, prior_loss_weight
        self.schedule = denoising.schedule  # the noise schedule every objective exposes (exports read its sampler)
        self.parts = RunningMeans(["loss_instance", "loss_prior"], device)

    @staticmethod
    def batch_inputs(batch: dict, device: torch.device) -> dict:
        """What the step reads from the batch beside x0 and its conditioning: which samples are class images, and
        how many (counted on the host, so the step needs no device sync for it)."""
        prior = batch["prior"].to(torch.bool)
        return {"prior": prior.to(device, non_blocking=True), "n_prior": int(prior.sum())}

    def forward(self, x0: torch.Tensor, cond: Conditioning, generator: torch.Generator, prior: torch.Tensor,
                n_prior: int, loss_weights: torch.Tensor | None = None) -> torch.Tensor:
        """Per-sample losses, weighted so that their mean is mean_instance + w · mean_class (instance images may be
        masked; class images weigh 1 everywhere)."""
        per_sample = self.denoising(x0, cond, generator, loss_weights)
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
        return (f"objective prior_preservation (class loss × {self.prior_loss_weight:g}, as many class images as "
                f"instance images per step); {self.schedule.describe()}")
