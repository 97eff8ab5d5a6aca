"""What a training step minimises, one file per objective; `build_objective` picks one from the config.

Every objective is an `nn.Module` (so DDP wraps the whole training forward and its gradient hooks
run) with the same small surface the runner relies on:
  forward(x0, cond, generator) → per-sample (or per-pair) losses, σ and noise drawn inside;
  commit(keep)                 → end of an update: count its statistics unless it was skipped;
  metrics()                    → means since the last call, over all ranks (a collective);
  describe()                   → the objective in one line for the run's first log line;
  batch_inputs(batch, device)  → (optional) what else of the batch forward takes, as keyword arguments.
A masked dataset's batches carry `loss_weights`, passed to forward as that keyword (denoising objectives).
"""

from __future__ import annotations

import torch

from ..files import DTYPES
from ..errors import UserError
from .denoising import Denoising
from .dpo import DPO, Reference, frozen_copy
from .prior import CLASS_KEYS, PriorPreservation, prior_options
from .schedule import NoiseSchedule, build_noise_schedule

OBJECTIVES = ("denoising", "dpo", "prior_preservation")
REFERENCES = ("auto", "adapters_off", "frozen_copy")


def objective_options(cfg) -> dict:
    """`objective` from the config (default: denoising), checked before any data or model loads."""
    options = dict(cfg.get("objective") or {"type": "denoising"})
    kind = options.get("type", "denoising")
    if kind not in OBJECTIVES:
        raise UserError(f"objective.type must be one of {', '.join(map(repr, OBJECTIVES))}, got {kind!r}")
    options["type"] = kind
    data_cfg = cfg.train_dataloader.dataset
    pairs = bool(data_cfg.get("pairs"))
    if kind == "dpo":
        if not pairs:
            raise UserError("objective.type='dpo' trains on preference pairs: set train_dataloader.dataset.pairs "
                            "(e.g. dict(format='pickapic') or dict(chosen_column='chosen', rejected_column='rejected'))")
        if data_cfg.get("streaming"):
            raise UserError("preference pairs are not read in streaming mode yet; set train_dataloader.dataset.streaming=False")
        options.update(_dpo_options(cfg, options))
    elif pairs:
        raise UserError(f"train_dataloader.dataset.pairs holds preference pairs, which objective.type={kind!r} cannot use; "
                        "set objective=dict(type='dpo') or remove pairs")
    if kind == "prior_preservation":
        if data_cfg.get("streaming"):
            raise UserError("objective.type='prior_preservation' pairs every batch with class images of its bucket, which needs "
                            "a scanned dataset; set train_dataloader.dataset.streaming=False")
        options.update(prior_options(options))
    else:
        stray = sorted(k for k in options if k in CLASS_KEYS)
        if stray:
            raise UserError(f"objective.{stray[0]} is read only with objective.type='prior_preservation' (DreamBooth's prior "
                            f"preservation), not with type={kind!r}: set the type, or remove {', '.join(stray)}")
    return options


def _dpo_options(cfg, options: dict) -> dict:
    try:
        beta = float(options.get("beta", 5000.0))
    except (TypeError, ValueError):
        beta = float("nan")
    if not beta > 0 or beta == float("inf"):
        raise UserError(f"objective.beta must be a positive number (Diffusion-DPO uses 5000 for SDXL), got {options.get('beta')!r}")
    lora = dict(cfg.model.get("lora") or {})
    reference = options.get("reference", "auto")
    if reference not in REFERENCES:
        raise UserError(f"objective.reference must be one of {', '.join(map(repr, REFERENCES))}, got {reference!r}")
    if reference == "auto":
        reference = "adapters_off" if lora.get("enabled") else "frozen_copy"
    if reference == "adapters_off" and not lora.get("enabled"):
        raise UserError("objective.reference='adapters_off' needs model.lora.enabled=True (the reference is the UNet with "
                        "its LoRA switched off); for a full fine-tune use reference='frozen_copy'")
    if lora.get("enabled") and lora.get("text_encoders"):
        raise UserError("objective.type='dpo' with model.lora.text_encoders=True is not supported: the reference would "
                        "see the trained text encoders' conditioning; train the UNet's LoRA only")
    if cfg.get("strategy", "ddp") == "fsdp":
        raise UserError("objective.type='dpo' with strategy='fsdp' is not supported yet; use strategy='ddp' "
                        "(with LoRA, or a memory-lean optimizer for a full fine-tune)")
    weighting = options.get("loss_weighting", "epsilon")
    if weighting not in ("epsilon", "edm", "none"):
        raise UserError(f"objective.loss_weighting must be 'epsilon', 'edm' or 'none', got {weighting!r}")
    dtype = options.get("reference_dtype", "bf16")
    if dtype not in DTYPES:
        raise UserError(f"objective.reference_dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return {"beta": beta, "reference": reference, "loss_weighting": weighting, "reference_dtype": dtype}


def batch_inputs(objective, batch: dict, device) -> dict:
    """The keyword arguments an objective reads from the batch beside x0 and its conditioning (none for most)."""
    read = getattr(objective, "batch_inputs", None)
    extra = read(batch, device) if read is not None else {}
    if "loss_weights" in batch:  # masked loss (data/masks.py)
        extra["loss_weights"] = batch["loss_weights"].to(device, non_blocking=True)
    return extra


def build_objective(options: dict, model_cfg: dict, model, device):
    """The objective module around `model.unet` (engine.build.ModelParts), built before any resume; `options` from
    `objective_options`, `model_cfg` the model section (its σ sampling and loss weighting, or the DDPM schedule)."""
    schedule = build_noise_schedule(model_cfg, model.scheduler_config, lora=model.lora is not None)
    if options["type"] == "denoising":
        return Denoising(model.unet, schedule, device)
    if options["type"] == "prior_preservation":
        return PriorPreservation(Denoising(model.unet, schedule, device), options["prior_loss_weight"], device)
    if options["reference"] == "adapters_off":
        reference = Reference(schedule.denoiser(model.unet), adapters_off=True)
    else:  # low precision on a GPU only: a CPU computes it in fp32 like everything else
        dtype = DTYPES[options["reference_dtype"]] if device.type == "cuda" else torch.float32
        reference = Reference(schedule.denoiser(frozen_copy(model.unet, dtype).to(device)), adapters_off=False)
    return DPO(model.unet, reference, schedule, options["beta"], options["loss_weighting"], device)


__all__ = ["DPO", "Denoising", "NoiseSchedule", "PriorPreservation", "batch_inputs", "build_noise_schedule", "build_objective", "objective_options"]
