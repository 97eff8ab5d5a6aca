"""Optimizer and learning-rate schedule from the config's `optim_wrapper` and `param_scheduler`."""

from __future__ import annotations

import torch

from ..errors import UserError


def build_optimizer(params, cfg: dict, use_fused: bool):
    options = dict(cfg)
    kind = options.pop("type", "AdamW")
    if kind != "AdamW":
        raise UserError(f"optim_wrapper.optimizer.type '{kind}' is not supported yet; use AdamW")
    if "betas" in options:
        options["betas"] = tuple(options["betas"])
    return torch.optim.AdamW(params, fused=use_fused or None, **options)


def build_lr_scheduler(optimizer, cfg: dict, max_iters: int):
    from diffusers.optimization import get_scheduler

    options = dict(cfg)
    name = options.pop("type", "constant")
    warmup = options.pop("warmup_iters", 0)
    try:
        return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=max_iters, **options)
    except (ValueError, TypeError) as error:
        raise UserError(f"param_scheduler: {error}") from None
