"""Optimizer and learning-rate schedule from the config's `optim_wrapper` and `param_scheduler`.

`optim_wrapper.optimizer.type`:
- `AdamW` (default): torch's, fused on CUDA.
- `Adafactor`: torch's factored second moments — optimizer state of about one extra row+column per
  matrix instead of two full copies of the weights.
- `AdamW8bit`: bitsandbytes' block-wise 8-bit AdamW states (a quarter of AdamW's optimizer memory);
  on CUDA any bitsandbytes, elsewhere bitsandbytes >= 0.50 (the first with 8-bit optimizers on a CPU).
- `Prodigy` (prodigyopt), `Lion` (lion-pytorch), `CAME` (came-pytorch), `AdamWScheduleFree` (schedulefree):
  what fine-tuners pick, each from its own package, installed with its extra (`pip install "pgv25[prodigy]"`).
  A schedule-free optimizer trains one sequence of weights and means another (their running average):
  `eval_weights` swaps the latter in around validation samples and exports.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import logging

import torch

from ..errors import UserError

logger = logging.getLogger("pgv25")

# name → (module, class, the package to pip install, pgv25's extra)
PACKAGED = {"Prodigy": ("prodigyopt", "Prodigy", "prodigyopt", "prodigy"),
            "Lion": ("lion_pytorch", "Lion", "lion-pytorch", "lion"),
            "CAME": ("came_pytorch", "CAME", "came-pytorch", "came"),
            "AdamWScheduleFree": ("schedulefree", "AdamWScheduleFree", "schedulefree", "schedulefree")}
OPTIMIZERS = ("AdamW", "Adafactor", "AdamW8bit", *PACKAGED)
# Optimizers whose step reads the whole group, so stepping one parameter at a time (engine/param_update.py) would
# change what they compute: why, as said in the refusal.
PER_GROUP_OPTIMIZERS = {"Prodigy": "its step-size estimate sums over every parameter",
                        "AdamWScheduleFree": "it counts steps per group, not per parameter"}


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


def _packaged(kind: str):
    module, name, package, extra = PACKAGED[kind]
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError:
        raise UserError(f"optimizer {kind} needs {package}: pip install \"pgv25[{extra}]\" (or pip install {package})") from None


def _adapt_inherited(kind: str, options: dict) -> dict:
    """A base config's AdamW keys that mean something else to this optimizer: dropped with a warning, not an error."""
    if kind == "CAME":  # three betas and two eps: AdamW's pair and scalar do not fit
        for key, size in (("betas", 3), ("eps", 2)):
            value = options.get(key)
            if value is not None and (not isinstance(value, tuple) or len(value) != size):
                logger.warning("optimizer CAME's %s has %d values; the inherited %s %s is ignored", key, size, key, options.pop(key))
    if kind == "Prodigy" and options.get("lr", 1.0) < 0.1:  # Prodigy estimates the step size; lr scales it
        logger.warning("optimizer Prodigy estimates its own step size: its lr is a multiplier, usually 1.0 (got %s)",
                       options["lr"])
    return options


def optimizer_type(cfg: dict) -> str:
    """`optim_wrapper.optimizer.type`, or one line listing the choices."""
    kind = cfg.get("type", "AdamW")
    if kind not in OPTIMIZERS:
        raise UserError(f"optim_wrapper.optimizer.type '{kind}' is not supported; choose one of {', '.join(OPTIMIZERS)}")
    return kind


def build_optimizer(params, cfg: dict, on_cuda: bool, sharded: bool = False):
    kind = optimizer_type(cfg)
    options = {k: v for k, v in cfg.items() if k != "type"}
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
    else:  # one of PACKAGED
        optimizer_class, options = _packaged(kind), _adapt_inherited(kind, options)
        if kind == "Prodigy" and sharded:  # its step-size estimate sums over all parameters: over every shard
            options["fsdp_in_use"] = True
    # Switching `type` on the command line keeps the base config's AdamW keys (betas, eps, ...):
    # drop the ones this optimizer does not take, and say so.
    accepted = inspect.signature(optimizer_class).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in accepted.values()):
        ignored = sorted(k for k in options if k not in accepted)
        if ignored:
            logger.warning("optimizer %s takes no %s: ignored", kind, ", ".join(ignored))
        options = {k: v for k, v in options.items() if k in accepted}
    try:
        optimizer = optimizer_class(params, **options)
    except (TypeError, ValueError, AssertionError) as error:  # lion-pytorch and came-pytorch check with assert
        raise UserError(f"optim_wrapper.optimizer ({kind}): {error or 'invalid settings ' + repr(options)}") from None
    if schedule_free(optimizer):
        optimizer.train()  # it refuses to step in eval mode, the mode it starts in
    return optimizer


def schedule_free(optimizer) -> bool:
    """A schedule-free optimizer (schedulefree): its parameters hold training weights, eval() swaps in the mean."""
    groups = getattr(optimizer, "param_groups", [])
    return bool(groups) and "train_mode" in groups[0] and callable(getattr(optimizer, "eval", None))


@contextlib.contextmanager
def eval_weights(optimizer, params):
    """Inside: the weights a schedule-free optimizer means you to use (its average); after: the training weights
    again, bit for bit. Its train() after eval() is a lerp each way, not exactly the identity in floating point, so
    the training weights are copied before and put back: a run that exports trains on like one that does not.
    Any other optimizer: nothing happens."""
    if optimizer is None or not schedule_free(optimizer):
        yield
        return
    with weights_put_back(params):
        optimizer.eval()
        try:
            yield
        finally:
            optimizer.train()


@contextlib.contextmanager
def weights_put_back(params):
    """Whatever happens to `params` inside, they leave it with the values they entered with, bit for bit."""
    kept = [p.detach().clone() for p in params]
    try:
        yield
    finally:
        with torch.no_grad():
            for p, value in zip(params, kept):
                p.copy_(value)


def build_lr_scheduler(optimizer, cfg: dict, max_iters: int):
    from diffusers.optimization import get_scheduler

    options = dict(cfg)
    name = options.pop("type", "constant")
    warmup = options.pop("warmup_iters", 0)
    try:
        return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=max_iters, **options)
    except (ValueError, TypeError) as error:
        raise UserError(f"param_scheduler: {error}") from None


# Packages whose optimizers make no state (schedulefree) or lack param-group keys (prodigyopt's d_denom) after the
# zero-lr step with which torch's distributed state-dict loader fills an empty optimizer before loading into it.
REAL_STEP_TO_INIT = ("prodigyopt", "schedulefree")


@torch.no_grad()
def prepare_for_loading(optimizer) -> None:
    """Give an optimizer its full state before a checkpoint is loaded into it; loading replaces every value made here.

    One of REAL_STEP_TO_INIT: one step on unit gradients at a positive lr, then the parameters put back bit for bit.
    Any other: a step at lr 0 for one parameter at a time (`state_one_parameter_at_a_time`)."""
    if any(optimizer.state.values()):
        return  # (schedulefree's train() leaves an empty dict per parameter: keys alone are no state)
    if type(optimizer).__module__.split(".")[0] not in REAL_STEP_TO_INIT:
        state_one_parameter_at_a_time(optimizer)
        return
    params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    lrs = [group["lr"] for group in optimizer.param_groups]
    with weights_put_back(params):
        for group in optimizer.param_groups:
            group["lr"] = group["lr"] or 1e-3  # a warm-up schedule starts at 0, and a zero lr makes no state
        for p in params:
            p.grad = torch.ones_like(p)
        with torch.enable_grad():
            optimizer.step()
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)


@torch.no_grad()
def state_one_parameter_at_a_time(optimizer) -> None:
    """The optimizer's state made one parameter at a time: a zero gradient and a step at lr 0 for each, its group
    narrowed to it (as the per-parameter update does). torch's state-dict loader would otherwise give every parameter
    a zero gradient at once before its lr-0 step: a full set of gradients, which a run updating inside backward never
    holds (4.8 GiB in bf16 at full size, more than the training step itself needs with gradient checkpointing).
    Sharded (DTensor) parameters are left to torch's loader: their gradients are shards already."""
    from torch.distributed.tensor import DTensor

    params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    if not params or any(isinstance(p, DTensor) or p.grad is not None for p in params):
        return
    lrs = [group.get("lr") for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        if "lr" in group:
            group["lr"] = torch.tensor(0.0) if isinstance(group["lr"], torch.Tensor) else 0.0
    try:
        for group in optimizer.param_groups:
            everyone = group["params"]
            try:
                for p in everyone:
                    if not p.requires_grad:
                        continue
                    group["params"] = [p]
                    p.grad = torch.zeros_like(p)
                    optimizer.step()
                    p.grad = None
            finally:
                group["params"] = everyone
    finally:
        for group, lr in zip(optimizer.param_groups, lrs):
            if lr is not None:
                group["lr"] = lr
