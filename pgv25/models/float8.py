"""FP8 training of the UNet's transformer blocks (`model.float8`), with torchao's float8 linear layers.

The attention projections of the image tokens (self-attention's to_q, to_k, to_v, to_out.0; cross-attention's to_q and
to_out.0) and the feed-forward projections (ff.net.0.proj, ff.net.2) of every BasicTransformerBlock carry most of the
step's FLOPs at 1024². Cross-attention's to_k and to_v stay in bf16: they project the 77 text tokens (about 1% of a
block's FLOPs), and float8's matmul needs its inner dimension a multiple of 16, which the weight gradient's
batch × 77 rows are not. Odd latent sizes in the lower blocks (a 1088-pixel side: 34 latent rows at 1/4) are padded
with zeros to that multiple (`pad_inner_dim`): exact, a copy of the float8 data. torchao's `Float8Linear` casts each matmul's
input and weight to float8 (e4m3, one scale per tensor) and the output gradient to e5m2, computes in float8 on
Hopper (H100/H200; compute capability 8.9 or more), and keeps the weights and optimizer state as they were. The
parameter names do not change, so checkpoints, resume and exports are those of the plain UNet.

`model.float8`:
- False (default, until a GPU measures the speed and the loss against bf16);
- True: on a GPU of compute capability ≥ 8.9; refused elsewhere in one line;
- 'emulate': torchao's emulation on any device (float8 rounding, computed in high precision): slow, for checking the
  code path and its effect on the loss, e.g. on a CPU with the tiny config.
"""

from __future__ import annotations

import logging

import torch

from ..errors import UserError

logger = logging.getLogger("pgv25")
TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_out.0", "ff.net.0.proj",
           "ff.net.2")
HOPPER = (8, 9)  # float8 tensor cores


def float8_setting(value) -> str | None:
    """None (off), 'native' or 'emulate'; one line for anything else."""
    if value in (None, False):
        return None
    if value is True:
        return "native"
    if value == "emulate":
        return "emulate"
    raise UserError(f"model.float8 must be False, True (float8 on a GPU of compute capability 8.9 or more) or 'emulate' "
                    f"(torchao's emulation on any device, slow), got {value!r}")


def targeted(module: torch.nn.Module, name: str) -> bool:
    """A transformer block's attention or feed-forward projection, with both sides multiples of 16 (float8 matmuls)."""
    return (isinstance(module, torch.nn.Linear) and ".transformer_blocks." in f".{name}" and name.endswith(TARGETS)
            and module.in_features % 16 == 0 and module.out_features % 16 == 0)


def enable_float8(unet: torch.nn.Module, setting: str, device: torch.device) -> int:
    """Swap the targeted Linear layers for torchao's Float8Linear in place; returns how many were swapped."""
    if setting == "native":
        capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
        if capability is None or capability < HOPPER:
            where = f"this GPU (compute capability {capability[0]}.{capability[1]})" if capability else "a CPU"
            raise UserError(f"model.float8=True needs float8 tensor cores (compute capability 8.9 or more: H100, H200, "
                            f"L4, RTX 4090); {where} has none: set model.float8=False, or 'emulate' to check the path slowly")
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError:
        raise UserError("model.float8 needs torchao: pip install \"pgv25[float8]\" (or pip install torchao)") from None
    config = Float8LinearConfig(emulate=setting == "emulate", pad_inner_dim=True)
    before = sum(1 for name, module in unet.named_modules() if targeted(module, name))
    convert_to_float8_training(unet, module_filter_fn=lambda module, name: targeted(module, name), config=config)
    logger.info("model.float8: %d linear layers of the transformer blocks in float8%s", before,
                " (emulated)" if setting == "emulate" else "")
    return before
