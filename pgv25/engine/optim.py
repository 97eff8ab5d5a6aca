"""Optimizer and learning-rate schedule from the config's `optim_wrapper` and `param_scheduler`.

`optim_wrapper.optimizer.type`:
- `AdamW` (default): torch's, fused on CUDA.
- `Adafactor`: torch's factored second moments — optimizer state of about one extra row+column per
  matrix instead of two full copies of the weights.
- `AdamW8bit`: bitsandbytes' block-wise 8-bit AdamW states (a quarter of AdamW's optimizer memory);
  on CUDA any bitsandbytes, elsewhere bitsandbytes >= 0.50 (the first with 8-bit optimizers on a CPU).
"""

from __future__ import annotations

import inspect
import logging

import torch

from ..errors import UserError

logger = logging.getLogger("pgv25")

OPTIMIZERS = ("AdamW", "Adafactor", "AdamW8bit")


CPU_8BIT_SINCE = (0, 50)  # bitsandbytes before 0.50 runs its 8-bit optimizer step on CUDA tensors only


def _adamw8bit(on_cuda: bool):
    try:
        import bitsandbytes
    except ImportError:
        raise UserError("optimizer AdamW8bit needs bitsandbytes: pip install bitsandbytes") from None
    version = tuple(int(part) for part in bitsandbytes.__version__.split(".")[:2] if part.isdigit())
    if not on_cuda and version < CPU_8BIT_SINCE:
        raise UserError(f"optimizer AdamW8bit without a CUDA GPU needs bitsandbytes >= 0.50 (this is {bitsandbytes.__version__}): "
                        "pip install -U bitsandbytes, or use AdamW or Adafactor")
    return bitsandbytes.optim.AdamW8bit


def build_optimizer(params, cfg: dict, on_cuda: bool):
    options = dict(cfg)
    kind = options.pop("type", "AdamW")
    for key in ("betas", "eps"):
        if isinstance(options.get(key), list):
            options[key] = tuple(options[key])
    if kind == "AdamW":
        optimizer_class, options = torch.optim.AdamW, {"fused": on_cuda or None, **options}
    elif kind == "Adafactor":
        if not hasattr(torch.optim, "Adafactor"):
            raise UserError("optimizer Adafactor needs torch >= 2.5")
        optimizer_class = torch.optim.Adafactor
        if "eps" in options and not isinstance(options["eps"], tuple):  # AdamW's scalar eps, inherited
            logger.warning("optimizer Adafactor's eps is a pair (eps1, eps2); the scalar eps %s is ignored", options.pop("eps"))
    elif kind == "AdamW8bit":
        optimizer_class = _adamw8bit(on_cuda)
    else:
        raise UserError(f"optim_wrapper.optimizer.type '{kind}' is not supported; choose one of {', '.join(OPTIMIZERS)}")
    # Switching `type` on the command line keeps the base config's AdamW keys (betas, eps, ...):
    # drop the ones this optimizer does not take, and say so.
    accepted = inspect.signature(optimizer_class).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in accepted.values()):
        ignored = sorted(k for k in options if k not in accepted)
        if ignored:
            logger.warning("optimizer %s takes no %s: ignored", kind, ", ".join(ignored))
        options = {k: v for k, v in options.items() if k in accepted}
    try:
        return optimizer_class(params, **options)
    except (TypeError, ValueError) as error:
        raise UserError(f"optim_wrapper.optimizer ({kind}): {error}") from None


def build_lr_scheduler(optimizer, cfg: dict, max_iters: int):
    from diffusers.optimization import get_scheduler

    options = dict(cfg)
    name = options.pop("type", "constant")
    warmup = options.pop("warmup_iters", 0)
    try:
        return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=max_iters, **options)
    except (ValueError, TypeError) as error:
        raise UserError(f"param_scheduler: {error}") from None
