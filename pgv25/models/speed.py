"""Speed levers for the UNet that leave its weights, state dict and trained function alone.

- `low_precision_norms`: GroupNorm/LayerNorm in the autocast dtype. Autocast runs both norms in fp32
  (they are on its fp32 list), so every norm reads bf16 activations, writes an fp32 copy and the next
  convolution casts it back: two extra passes over the largest tensors of the step. The CUDA kernels
  accumulate the statistics in fp32 whatever the input dtype, so computing the norm in bf16 loses only
  the rounding of its output, which the next bf16 convolution applies anyway.
- `compile_regions`: regional compilation (torch.compile of each repeated block instead of the whole
  UNet): the blocks of one kind share one compiled graph, so it compiles in seconds, not minutes.
- `attention_backend`: which scaled-dot-product-attention kernel the step tries first (cuDNN on Hopper).
"""

from __future__ import annotations

import contextlib
import logging

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError

logger = logging.getLogger("pgv25")

REPEATED_BLOCKS = {"transformer": "BasicTransformerBlock", "resnet": "ResnetBlock2D"}


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


def _normalise_in(dtype: torch.dtype, norm: nn.Module, x: torch.Tensor, function, *shape) -> torch.Tensor:
    """`function(x, *shape, weight, bias, eps)` with input and affine parameters in `dtype`, autocast off."""
    with torch.autocast(x.device.type, enabled=False):
        weight = norm.weight.to(dtype) if norm.weight is not None else None
        bias = norm.bias.to(dtype) if norm.bias is not None else None
        return function(x.to(dtype), *shape, weight, bias, norm.eps)


class LowPrecisionGroupNorm(nn.GroupNorm):
    """nn.GroupNorm that, under autocast, normalises in the autocast dtype instead of fp32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = _autocast_dtype(x)
        return super().forward(x) if dtype is None else _normalise_in(dtype, self, x, F.group_norm, self.num_groups)


class LowPrecisionLayerNorm(nn.LayerNorm):
    """nn.LayerNorm that, under autocast, normalises in the autocast dtype instead of fp32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = _autocast_dtype(x)
        return super().forward(x) if dtype is None else _normalise_in(dtype, self, x, F.layer_norm, self.normalized_shape)


_LOW_PRECISION = {nn.GroupNorm: LowPrecisionGroupNorm, nn.LayerNorm: LowPrecisionLayerNorm}


def low_precision_norms(model: nn.Module) -> int:
    """Switch every plain GroupNorm/LayerNorm of `model` to its low-precision twin, in place (same
    parameters, same state dict; outside autocast they compute exactly as before). Returns how many."""
    count = 0
    for module in model.modules():
        twin = _LOW_PRECISION.get(type(module))
        if twin is not None:
            module.__class__ = twin
            count += 1
    return count


def compile_regions(model: nn.Module, blocks=("transformer",), **compile_options) -> int:
    """torch.compile each block of the named kinds in place (`module.compile`: state dict unchanged).
    Returns how many modules were compiled."""
    names = {REPEATED_BLOCKS[b] for b in blocks}
    compiled = 0
    for module in model.modules():
        if type(module).__name__ in names:
            module.compile(**compile_options)
            compiled += 1
    if not compiled:
        raise ValueError(f"no {sorted(names)} in {type(model).__name__} to compile")
    return compiled


ATTENTION_BACKENDS = ("cudnn", "flash", "efficient", "math")


def attention_backend(name: str | None):
    """A context manager under which scaled_dot_product_attention tries kernel `name` first ('cudnn', 'flash',
    'efficient' or 'math') and the others after it, in that order, where `name` cannot take the inputs (e.g.
    the CUDA kernels on a CPU). None leaves PyTorch's own order."""
    if name is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    if name not in backends:
        raise ValueError(f"attention backend must be one of {', '.join(ATTENTION_BACKENDS)} or None, got {name!r}")
    order = [backends[name]] + [b for key, b in backends.items() if key != name]
    return sdpa_kernel(order, set_priority=True)


def on_device(setting, device: torch.device, key: str) -> bool:
    """A speed switch's value: True (everywhere), False, or 'cuda' (on GPUs only: a CPU keeps the plain path)."""
    if setting in (None, False, True):
        return bool(setting)
    if setting == "cuda":
        return device.type == "cuda"
    raise UserError(f"{key} must be True, False or 'cuda' (on GPUs only), got {setting!r}")


def compile_unet(unet, options: dict, buckets: int, device: torch.device, sharded: bool = False) -> None:
    """`torch.compile` the UNet in place (parameter names, and so checkpoints and exports, unchanged): the whole
    UNet, or with `regions` each of its repeated blocks (regional compilation: seconds instead of minutes)."""
    if not on_device(options.get("enabled"), device, "model.compile.enabled"):
        return
    if sharded and options.get("enabled") == "cuda":  # FSDP's hooks inside compiled blocks: not yet measured on GPUs
        logger.info("model.compile: not applied by default with strategy='fsdp' (set model.compile.enabled=True to force it)")
        return
    import torch._dynamo

    # One graph per bucket shape (and per train/eval and adapters on/off state, DPO's LoRA reference; per block
    # width with regions): keep them all rather than fall back to eager after the default 8.
    regions = options.get("regions")
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, (8 if regions else 4) * buckets)
    kwargs = {k: options[k] for k in ("backend", "mode", "dynamic", "fullgraph") if options.get(k) is not None}
    try:
        if regions:
            count = compile_regions(unet, [regions] if isinstance(regions, str) else list(regions), **kwargs)
        else:
            unet.compile(**kwargs)
    except KeyError as error:
        raise UserError(f"model.compile.regions: unknown block kind {error}; use {sorted(REPEATED_BLOCKS)}") from None
    except (RuntimeError, ValueError) as error:
        raise UserError(f"model.compile: {str(error).strip().splitlines()[0]}") from None
    what = f"{count} blocks ({', '.join(regions) if not isinstance(regions, str) else regions})" if regions else "UNet"
    logger.info("%s compiled with torch.compile(%s)", what, ", ".join(f"{k}={v!r}" for k, v in kwargs.items()))
