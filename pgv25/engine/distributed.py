"""How the UNet is spread over processes, and the few collectives the runner needs.

Strategies (`strategy=` in the config):
- `ddp`: every process holds the whole UNet; accelerate wraps it in DistributedDataParallel.
- `fsdp`: the UNet's parameters, gradients and optimizer state are sharded over the processes
  with torch's FSDP2 (`fully_shard`), one unit per ResNet / transformer block. We apply it
  ourselves rather than through accelerate's plugin because accelerate only enables FSDP on
  accelerators, and the same sharded code path must run (and be tested) on CPU with gloo.

Checkpoints always hold *full* state dicts keyed by parameter name (gathered with
`torch.distributed.checkpoint.state_dict`), so a run saved under one strategy resumes under another
and exports are the same diffusers files whatever the strategy.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from ..errors import UserError

STRATEGIES = ("ddp", "fsdp")
_GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)  # full tensors, on rank 0's CPU only


def check_strategy(name: str) -> str:
    if name == "deepspeed":
        raise UserError("strategy 'deepspeed' is not supported yet; use strategy='fsdp' to shard the UNet and its optimizer state")
    if name not in STRATEGIES:
        raise UserError(f"strategy '{name}' is unknown; choose one of: {', '.join(STRATEGIES)}")
    return name


def shard_unet(unet: torch.nn.Module, param_dtype: torch.dtype | None, reshard_after_forward: bool = True) -> None:
    """FSDP2 over the UNet: each ResNet and transformer block is one all-gather unit, the rest the root.

    `param_dtype` (bf16/fp16 on GPU) makes FSDP gather and compute in low precision while the sharded
    master weights and the gradient reduction stay fp32 — mixed precision without autocast casts.
    `reshard_after_forward=False` keeps each unit's gathered parameters from forward to backward:
    gradients and optimizer state stay sharded (ZeRO-2), one all-gather per step instead of two.
    """
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else MixedPrecisionPolicy()
    for module in unet.modules():
        if isinstance(module, (ResnetBlock2D, BasicTransformerBlock)):
            fully_shard(module, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(unet, mp_policy=policy, reshard_after_forward=reshard_after_forward)


def is_sharded(module: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def any_rank(flags: torch.Tensor) -> list[bool]:
    """Each flag of a 1-D tensor OR-ed over all processes, so every rank takes the same branch (skip,
    stop, save); the flags stay on the device until the one host transfer at the end."""
    flags = flags.to(torch.int32)
    if world()[1] > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return [bool(v) for v in flags.tolist()]


def sum_over_ranks(value: torch.Tensor) -> torch.Tensor:
    if world()[1] == 1:
        return value.clone()
    value = value.clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    return sum_over_ranks(value) / world()[1]


def gather_objects(obj) -> list:
    """`obj` from every rank, in rank order, on every rank (small things: RNG states, counters)."""
    if world()[1] == 1:
        return [obj]
    out = [None] * world()[1]
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s `obj` on every rank (e.g. whether rank 0's save succeeded, and why not)."""
    if world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def average_gradients(params: list[torch.Tensor]) -> None:
    """Mean of each gradient over all ranks, for trained parameters outside the DDP-wrapped module."""
    if params and world()[1] > 1:
        grads = [p.grad for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])  # one collective for all of them
        dist.all_reduce(flat)
        flat /= world()[1]
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


def full_model_state(model: torch.nn.Module, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """All weights (or only the trained ones: LoRA), full size, on CPU; empty on ranks other than 0 when sharded (a collective)."""
    state = get_model_state_dict(model, options=_GATHER)
    if trainable_only:
        trained = {name for name, p in model.named_parameters() if p.requires_grad}
        state = {k: v for k, v in state.items() if k in trained}
    return state


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Optimizer state keyed by parameter *name*, full size (a collective)."""
    return get_optimizer_state_dict(model, optimizer, options=_GATHER)


def load_full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, model_state: dict, optimizer_state: dict,
                    trainable_only: bool = False) -> None:
    """Inverse of the two above; each rank keeps its own shard. Missing or extra keys are an error
    (with `trainable_only`, among the trained parameters: the frozen ones come from the base model).

    With several processes only rank 0 passes the states (read from disk) and they are broadcast: a
    node of 8 ranks need not hold 8 copies of a full-size checkpoint in host memory.
    """
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=world()[1] > 1)
    if trainable_only:
        trained = {name for name, p in model.named_parameters() if p.requires_grad}
        if world()[0] == 0 and set(model_state) != trained:
            raise ValueError(f"checkpoint weights do not match the trained parameters ({len(model_state)} vs {len(trained)})")
        options = StateDictOptions(full_state_dict=True, strict=False, broadcast_from_rank0=world()[1] > 1)
        # strict=False for the optimizer too: an adapter that never receives a gradient (LoRA on CLIP's
        # last layer, whose output the penultimate-layer embeddings never use) has no optimizer state.
    if world()[1] == 1:  # one process: copy tensor by tensor (model_state may read them lazily from the file)
        copy_weights(model, model_state, trainable_only)
    else:
        set_model_state_dict(model, model_state, options=options)
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)


@torch.no_grad()
def copy_weights(model: torch.nn.Module, weights, trainable_only: bool = False) -> None:
    """`weights` (name → tensor, any mapping) into the model's parameters and buffers, one tensor at a time, cast to
    each one's dtype; missing or extra names are a ValueError, as load_state_dict's strict mode."""
    targets = {name.replace("_orig_mod.", ""): t for name, t in model.state_dict(keep_vars=True).items()  # DCP's names
               if not trainable_only or getattr(t, "requires_grad", False)}
    missing, extra = sorted(set(targets) - set(weights)), sorted(set(weights) - set(targets))
    if missing or extra:
        raise ValueError(f"checkpoint weights do not match the model: missing {missing[:3]}, unexpected {extra[:3]}")
    for name, target in targets.items():
        value = weights[name]
        if value.shape != target.shape:
            raise ValueError(f"checkpoint weight {name} has shape {tuple(value.shape)}, the model's {tuple(target.shape)}")
        target.data.copy_(value)
