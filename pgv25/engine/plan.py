"""Memory planner: the peak a run needs per device, part by part, before anything loads (`pgv25 plan`).

The static parts are arithmetic on the model's parameter shapes, built on the meta device from the pipeline's
configs (no weights read): trained weights, the frozen UNet under a LoRA, gradients, optimizer state (each
optimizer's own layout, e.g. torch Adafactor's row and column factors), EMA, and the frozen encoders when the
latent cache is off. Two parts are calibrated from measured peaks (docs/performance.md, "The memory planner"):

- activations per image, at 1024² (a 128×128 latent) under bf16 autocast, scaled by the bucket's pixels: eager
  5.84 GiB, transformer blocks compiled 5.4, gradient checkpointing 0.39; a LoRA on the attention projections
  7.2 eager (peft keeps fp32 and bf16 copies of each targeted layer's input). fp32 compute doubles them;
- the bf16 copies autocast makes of fp32 matmul and convolution weights and keeps for backward (one per weight,
  4.8 GiB at full size) when no checkpointing recomputes them.

On a GPU the prediction is torch's peak allocated memory; a card fits it with `RESERVE_GIB` for the CUDA context
and `FRAGMENTATION` for the caching allocator. On a CPU it is the process's resident memory: the interpreter and
libraries (`CPU_PROCESS_GIB`), the heap a per-tensor update leaves behind (`CPU_UPDATE_RETAINED_GIB`) and, while the
UNet loads, the weights file's pages mapped beside the loaded copy.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, fields, replace
from pathlib import Path

from ..errors import UserError

logger = logging.getLogger("pgv25")

GIB = 2**30
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
# GiB of activations per image at 1024² with bf16 compute (docs/performance.md, "The memory planner").
ACTIVATIONS_1024 = {"eager": 5.84, "compiled": 5.4, "checkpointed": 0.39}
LORA_ACTIVATIONS = 7.2 / 5.84  # a LoRA on the attention projections over the same UNet, without checkpointing
REFERENCE_PIXELS = 1024 * 1024
RESERVE_GIB = 1.0  # CUDA context and cuBLAS/cuDNN workspaces: outside torch's allocated memory
FRAGMENTATION = 1.05  # the caching allocator's reserved memory over its peak allocated
# A CPU process's own resident memory (measured at full size, docs/performance.md): Python, torch, diffusers and
# transformers imported (while the UNet loads), and a training process's whole overhead (dataset, autograd, threads).
CPU_IMPORTS_GIB, CPU_PROCESS_GIB = 0.4, 1.0
# Updating one tensor at a time (bf16 weights, fused_backward) allocates and frees an fp32 copy of each of 1,680 tensors
# every step; glibc keeps much of that freed heap: 1.4–2.0 GiB above the arithmetic in the measured CPU runs.
CPU_UPDATE_RETAINED_GIB = 1.7
PLAYGROUND = "playgroundai/playground-v2.5-1024px-aesthetic"
OPTIMIZERS = ("AdamW", "Adafactor", "AdamW8bit", "Prodigy", "Lion", "CAME", "AdamWScheduleFree")
BNB_MIN_8BIT = 4096  # bitsandbytes keeps 32-bit state for smaller tensors
BNB_BLOCK = 256  # elements per absmax of bitsandbytes' block-wise 8-bit state


@dataclass(frozen=True)
class Shapes:
    """What memory depends on in the pipeline: every UNet parameter's shape, the Linear layers a LoRA may target,
    and the frozen encoders' sizes."""

    unet: tuple[tuple[int, ...], ...]
    linears: tuple[tuple[str, int, int], ...]  # (module name, in_features, out_features)
    matmul_params: int  # Linear and Conv weights: what autocast copies to bf16
    text_encoders: int
    vae: int

    @property
    def unet_params(self) -> int:
        return sum(math.prod(s) for s in self.unet)

    @property
    def largest(self) -> int:
        return max(math.prod(s) for s in self.unet)

    def lora_params(self, rank: int, targets: tuple[str, ...], dora: bool = False) -> int:
        hits = [(i, o) for name, i, o in self.linears if any(name == t or name.endswith("." + t) for t in targets)]
        return sum(rank * (i + o) + (o if dora else 0) for i, o in hits)


def optimizer_state_bytes(kind: str, shapes) -> int:
    """Bytes of optimizer state for tensors of these shapes, by each optimizer's own layout (fp32 state; with bf16
    trained weights pgv25 keeps it fp32 too). Checked against the real optimizers' state in the tests."""
    total = 0
    for shape in shapes:
        n = math.prod(shape)
        if kind in ("AdamW", "AdamWScheduleFree"):  # two moments (schedule-free: z and the second moment)
            total += 8 * n
        elif kind == "Lion":
            total += 4 * n
        elif kind == "Prodigy":  # two moments, the start point p0 and the accumulator s
            total += 16 * n
        elif kind == "Adafactor":  # torch's: row and column factors over the last two dimensions
            total += 4 * (n // shape[-1] + n // shape[-2]) if len(shape) >= 2 else 4 * n
        elif kind == "CAME":  # a first moment, and row/column factors of the second moment and of the residual
            total += 4 * (n + 2 * (n // shape[-1] + n // shape[-2])) if len(shape) >= 2 else 8 * n
        elif kind == "AdamW8bit":
            total += 2 * n + 8 * math.ceil(n / BNB_BLOCK) + 2048 if n >= BNB_MIN_8BIT else 8 * n
        else:
            raise UserError(f"optimizer {kind!r} is unknown to the planner; choose one of: {', '.join(OPTIMIZERS)}")
    return total


@dataclass(frozen=True)
class Setup:
    """The choices that decide memory: the levers (`pgv25 plan` varies these) and the run's fixed facts."""

    lora_rank: int | None  # None: a full fine-tune
    lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    dora: bool = False
    trained_dtype: str = "fp32"
    frozen_dtype: str = "fp32"  # the UNet under a LoRA, as loaded
    optimizer: str = "AdamW"
    fused_backward: bool = False
    checkpointing: bool = False
    compiled: bool = False  # transformer blocks compiled (a GPU's default)
    batch: int = 1  # per device
    accumulation: int = 1
    cached: bool = True  # from the latent cache: no encoders during training
    pixels: int = REFERENCE_PIXELS  # the largest bucket's
    processes: int = 1
    strategy: str = "ddp"
    reshard_after_forward: bool = True
    device: str = "cuda"
    mixed_precision: str = "bf16"
    weight_dtype: str = "bf16"  # text encoders on a GPU
    vae_dtype: str = "fp32"
    ema: bool = False
    unet_file_bytes: int | None = None  # the UNet weights file as stored (CPU loading peak)
    resuming: bool = False  # a CPU process resuming reads the optimizer state while a weights file is mapped

    @property
    def lora(self) -> bool:
        return self.lora_rank is not None

    @property
    def sharded(self) -> bool:
        return self.strategy == "fsdp" and self.processes > 1

    @property
    def compute_dtype(self) -> str:
        """What the UNet's activations are stored in: bf16 under autocast, else fp32 (a CPU autocasts only bf16
        trained weights)."""
        if self.device == "cpu":
            return "bf16" if self.trained_dtype == "bf16" else "fp32"
        return "fp32" if self.mixed_precision == "no" else "bf16"

    def levers(self) -> list[str]:
        """The --cfg-options that set this setup's levers."""
        options = [f"train_dataloader.batch_size={self.batch}", f"optim_wrapper.accumulative_counts={self.accumulation}",
                   f"model.gradient_checkpointing={self.checkpointing}"]
        if self.lora:
            options += ["model.lora.enabled=True", f"model.lora.rank={self.lora_rank}", f"model.frozen_dtype={self.frozen_dtype}"]
        else:
            options += [f"model.trained_dtype={self.trained_dtype}", f"optim_wrapper.optimizer.type={self.optimizer}"]
            if self.fused_backward:
                options += ["optim_wrapper.fused_backward=True", "optim_wrapper.clip_grad=None"]
        if self.strategy == "fsdp" and self.processes > 1:
            options.append("strategy=fsdp")
        return options


@dataclass(frozen=True)
class Plan:
    """Predicted GiB per device, part by part; `peak` is what the device must hold at once."""

    trained_weights: float
    frozen_unet: float
    gradients: float
    optimizer_state: float
    ema: float
    encoders: float
    weight_copies: float  # autocast's bf16 copies of fp32 weights, kept for backward
    activations: float
    update_transient: float  # fp32 copies of one tensor while it is updated (bf16 weights), DDP's gradient buckets
    process: float  # a CPU process's own memory (0 on a GPU: torch's allocated memory excludes the context)
    loading: float  # a CPU process's peak while the UNet loads (the file mapped beside the loaded weights)

    @property
    def training(self) -> float:
        return sum(getattr(self, f.name) for f in fields(self) if f.name != "loading")

    @property
    def peak(self) -> float:
        return max(self.training, self.loading)

    def rows(self) -> list[tuple[str, float]]:
        names = {"trained_weights": "trained weights", "frozen_unet": "frozen UNet", "gradients": "gradients",
                 "optimizer_state": "optimizer state", "ema": "EMA weights", "encoders": "text encoders and VAE",
                 "weight_copies": "bf16 weight copies (autocast)", "activations": "activations",
                 "update_transient": "update transient", "process": "process (CPU)"}
        return [(label, getattr(self, key)) for key, label in names.items() if getattr(self, key) > 0]


def predict(shapes: Shapes, setup: Setup) -> Plan:
    """The peak of one device (GiB) for this setup."""
    s, shard = setup, (setup.processes if setup.sharded else 1)
    n_unet = shapes.unet_params
    if s.lora:
        n_trained = shapes.lora_params(s.lora_rank, s.lora_targets, s.dora)
        trained_bytes, trained_shapes = 4, [(n_trained,)]  # adapters train in fp32; small tensors: AdamW-like layout
        frozen = n_unet * BYTES[s.frozen_dtype]
    else:
        n_trained, trained_bytes, trained_shapes, frozen = n_unet, BYTES[s.trained_dtype], shapes.unet, 0
    largest = shapes.largest if not s.lora else 0
    weights = n_trained * trained_bytes / shard
    gradients = (largest if s.fused_backward else n_trained / shard) * trained_bytes
    state = optimizer_state_bytes(s.optimizer, trained_shapes) / shard
    ema = n_trained * 4 / shard if s.ema else 0
    encoders = 0 if s.cached else shapes.text_encoders * BYTES[s.weight_dtype if s.device == "cuda" else "fp32"] + \
        shapes.vae * BYTES[s.vae_dtype if s.device == "cuda" else "fp32"]
    # autocast copies fp32 weights to bf16 for each matmul and keeps the copy for backward, unless checkpointing
    # recomputes the block (or FSDP gathers bf16 weights itself)
    fp32_unet = (not s.lora and s.trained_dtype == "fp32") or (s.lora and s.frozen_dtype == "fp32")
    copies = shapes.matmul_params * 2 if (s.compute_dtype == "bf16" and fp32_unet and not s.checkpointing
                                            and not s.compiled and not s.sharded) else 0
    if s.sharded:  # FSDP gathers one block at a time in bf16 (or keeps the whole model gathered between passes)
        copies = (shapes.largest * 2 * 4) if s.reshard_after_forward else n_unet * 2
    # peft casts each targeted layer's input to the adapters' fp32 and autocast back to bf16: two more copies of it
    # kept for backward, unless checkpointing recomputes them
    mode = "checkpointed" if s.checkpointing else "compiled" if s.compiled else "eager"
    per_image = ACTIVATIONS_1024[mode] * (LORA_ACTIVATIONS if s.lora and not s.checkpointing else 1)
    activations = per_image * GIB * s.batch * s.pixels / REFERENCE_PIXELS * (2 if s.compute_dtype == "fp32" else 1)
    transient = 0
    if not s.lora and s.trained_dtype == "bf16":  # the tensor being updated, and its gradient, in fp32
        transient += 2 * 4 * largest
    if s.processes > 1 and not s.sharded:  # DDP averages gradients in buckets of their own, as large as the gradients
        transient += n_trained * trained_bytes
    process = CPU_PROCESS_GIB * GIB if s.device == "cpu" else 0
    if s.device == "cpu" and not s.lora and (s.trained_dtype != "fp32" or s.fused_backward):
        transient += CPU_UPDATE_RETAINED_GIB * GIB
    loading = 0
    if s.device == "cpu":  # the weights as loaded, and the file's pages mapped while they are read
        unet_loaded, imports = (frozen if s.lora else n_unet * BYTES[s.trained_dtype]), CPU_IMPORTS_GIB * GIB
        loading = imports + unet_loaded + (s.unet_file_bytes if s.unet_file_bytes is not None else n_unet * 2)
        if s.resuming:  # the checkpoint's weights are copied in from their mapped file, then its optimizer state read
            loading = max(loading, imports + unet_loaded + n_trained * trained_bytes + state)
    return Plan(*(value / GIB for value in (weights, frozen, gradients, state, ema, encoders, copies, activations,
                                            transient, process, loading)))


def fits(plan: Plan, memory_gib: float) -> bool:
    """Whether a card of `memory_gib` holds the plan: the peak with the allocator's slack, beside the CUDA context."""
    return plan.peak * FRAGMENTATION + RESERVE_GIB <= memory_gib


# --- the levers tried, cheapest in speed first -------------------------------------------------------------------------

def candidates(base: Setup, effective_batch: int) -> list[Setup]:
    """Every combination of levers worth trying for this run, each at batch 1 and accumulation reaching the
    config's effective batch (`largest_batch` then grows the batch)."""
    per_device = max(1, math.ceil(effective_batch / base.processes))
    common = {"batch": 1, "accumulation": per_device}
    found = []
    for checkpointing in (False, True):
        if base.lora:
            for frozen in ("bf16", "fp32") if base.device == "cuda" else ("fp32", "bf16"):
                found.append(replace(base, checkpointing=checkpointing, frozen_dtype=frozen, **common,
                                     compiled=base.compiled and not checkpointing))
            continue
        # what pgv25 refuses is never proposed: under FSDP no bf16 weights, 8-bit AdamW or update inside backward
        for trained in ("fp32",) if base.sharded else ("fp32", "bf16"):
            for optimizer in ("AdamW", "Adafactor") if base.sharded else ("AdamW", "AdamW8bit", "Adafactor"):
                for fused in (False, True):
                    if fused and base.processes > 1:  # refused: DDP would average after the updates
                        continue
                    found.append(replace(base, checkpointing=checkpointing, trained_dtype=trained, optimizer=optimizer,
                                         fused_backward=fused, compiled=base.compiled and not checkpointing, **common))
    return found


def largest_batch(shapes: Shapes, setup: Setup, memory_gib: float, effective_batch: int) -> Setup | None:
    """The setup at the largest per-device batch that fits (up to the effective batch), with the accumulation that
    makes up the rest; None if batch 1 does not fit. The update inside backward cannot accumulate: its batch is the
    whole effective batch or nothing."""
    per_device = max(1, math.ceil(effective_batch / setup.processes))
    sizes = [per_device] if setup.fused_backward else range(per_device, 0, -1)
    for batch in sizes:
        trial = replace(setup, batch=batch, accumulation=math.ceil(per_device / batch))
        if fits(predict(shapes, trial), memory_gib):
            return trial
    return None


SLOWDOWN = {"checkpointing": 1.3, "AdamW8bit": 1.02, "Adafactor": 1.03}  # rough cost of each lever, for ordering only


def ranked(shapes: Shapes, base: Setup, memory_gib: float, effective_batch: int) -> list[tuple[Setup, Plan]]:
    """The setups that fit, the likely fastest first: no checkpointing before checkpointing, then larger batches,
    then fewer precision levers."""
    found = {}
    for setup in candidates(base, effective_batch):
        best = largest_batch(shapes, setup, memory_gib, effective_batch)
        if best is not None:
            found[best] = predict(shapes, best)

    def cost(item):
        s = item[0]
        slow = (SLOWDOWN["checkpointing"] if s.checkpointing else 1) * SLOWDOWN.get(s.optimizer, 1)
        return (s.checkpointing, -s.batch, slow, s.trained_dtype != "fp32", s.fused_backward, item[1].peak)

    return sorted(found.items(), key=cost)


# --- from a config ---------------------------------------------------------------------------------------------------

def component_configs(name: str, key: str = "model.pretrained_model_name_or_path") -> tuple[dict, dict, dict, dict, Path | None]:
    """The UNet, VAE and both text encoders' configs (and the local folder, if any) for `name`: a local pipeline
    folder, the hub's config files (a few KB, never weights), or, for Playground v2.5 itself when the hub cannot be
    reached, its published configs (the same numbers)."""
    from ..models import playground_configs as published
    from ..models.loading import (
        HUB_ID,
        _offline,
        check_pipeline_folder,
        hub_unreachable_message,
    )

    path = Path(name).expanduser()
    parts = ("unet", "vae", "text_encoder", "text_encoder_2")
    if path.is_dir():
        check_pipeline_folder(path)
        return (*(json.loads((path / part / "config.json").read_text()) for part in parts), path)
    if not HUB_ID.match(name):
        raise UserError(f"model '{name}' is neither a directory nor a Hugging Face hub id (owner/name)")
    try:
        from huggingface_hub import hf_hub_download

        files = [hf_hub_download(name, f"{part}/config.json", local_files_only=_offline()) for part in parts]
        return (*(json.loads(Path(f).read_text()) for f in files), None)
    except Exception:  # noqa: BLE001 — offline, missing, or no such repo: the same answer for the planner
        if name == PLAYGROUND:
            logger.info("the hub is unreachable: planning with Playground v2.5's published component configs")
            return published.UNET, published.VAE, published.TEXT_ENCODER, published.TEXT_ENCODER_2, None
        raise UserError(hub_unreachable_message(name, "model", key)) from None


def model_shapes(name: str) -> tuple[Shapes, Path | None]:
    """Every parameter's shape for the pipeline `name` (and its local folder, if any)."""
    *configs, folder = component_configs(name)
    return shapes_of(*configs), folder


def shapes_of(unet_cfg: dict, vae_cfg: dict, te_cfg: dict, te2_cfg: dict) -> Shapes:
    """The models built from their configs on the meta device (no memory, no weights), and their shapes."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_cfg)
        vae = AutoencoderKL.from_config(vae_cfg)
        encoders = [CLIPTextModel(CLIPTextConfig(**_clip_fields(te_cfg))),
                    CLIPTextModelWithProjection(CLIPTextConfig(**_clip_fields(te2_cfg)))]
    count = lambda module: sum(p.numel() for p in module.parameters())
    return Shapes(
        unet=tuple(tuple(p.shape) for p in unet.parameters()),
        linears=tuple((n, m.in_features, m.out_features) for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear)),
        matmul_params=sum(m.weight.numel() for m in unet.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))),
        text_encoders=sum(map(count, encoders)), vae=count(vae))


def _clip_fields(config: dict) -> dict:
    """A text encoder's config.json as CLIPTextConfig's keyword arguments (its bookkeeping keys dropped)."""
    return {k: v for k, v in config.items() if not k.startswith("_") and k not in ("architectures", "torch_dtype", "dtype",
                                                                                     "transformers_version", "model_type")}


def unet_file_bytes(folder: Path | None) -> int | None:
    """Size of the UNet's weights as stored (what a CPU process maps while loading), when the folder is local."""
    if folder is None:
        return None
    files = list((folder / "unet").glob("*.safetensors"))
    return sum(f.stat().st_size for f in files) or None


def setup_of(options, device: str, processes: int) -> Setup:
    """The run's setup as its config sets it (`read_options`), on `processes` devices of kind `device`."""
    model, optim, data, lora = options.model, options.optim, options.data, options.lora
    mixed = options.runtime.mixed_precision
    frozen = model.frozen_dtype if model.frozen_dtype != "auto" else ("fp32" if device == "cpu" or mixed == "no" else mixed)
    compile_on = model.compile.get("enabled") in (True, "cuda") and device == "cuda" and model.compile.get("regions") is not None
    resolution = int(data.resolution or 1024)
    return Setup(
        lora_rank=int(lora.get("rank", 16)) if lora.enabled else None,
        lora_targets=tuple(lora.get("target_modules") or ("to_q", "to_k", "to_v", "to_out.0"))
        + (("ff.net.0.proj", "ff.net.2") if lora.get("feed_forward") else ()),
        dora=bool(lora.get("use_dora")), trained_dtype=model.trained_dtype, frozen_dtype=frozen,
        optimizer=optim.type, fused_backward=optim.fused_backward, checkpointing=model.gradient_checkpointing,
        compiled=compile_on and not model.gradient_checkpointing, batch=data.batch_size, accumulation=optim.accumulation,
        cached=data.cached, pixels=resolution * resolution, processes=processes, strategy=options.runtime.strategy,
        reshard_after_forward=options.runtime.reshard_after_forward, device=device,
        mixed_precision="no" if device == "cpu" else mixed, weight_dtype=model.weight_dtype, vae_dtype=model.vae_dtype,
        ema=options.ema.settings is not None)


# --- what `pgv25 plan` prints -----------------------------------------------------------------------------------------

def describe(setup: Setup) -> str:
    """The levers of a setup in a few words."""
    if setup.lora:
        words = [f"LoRA rank {setup.lora_rank}", f"{setup.frozen_dtype} frozen UNet"]
    else:
        words = ["full", f"{setup.trained_dtype} weights" + (" (stochastic rounding)" if setup.trained_dtype == "bf16" else ""),
                 setup.optimizer] + (["update in backward"] if setup.fused_backward else [])
    words += (["checkpointing"] if setup.checkpointing else []) + (["compiled blocks"] if setup.compiled else [])
    return ", ".join(words)


def breakdown(setup: Setup, plan: Plan, shapes: Shapes, unit: str) -> list[str]:
    lines = [(f"{describe(setup)}; batch {setup.batch} × {setup.accumulation} accumulation per {unit} at "
              f"{int(math.sqrt(setup.pixels))}² ({'latent cache' if setup.cached else 'encoders every step'}); "
              f"UNet {shapes.unet_params:,} parameters")]
    lines += [f"  {label:<32}{value:8.2f} GiB" for label, value in plan.rows()]
    lines.append(f"  {'peak while training':<32}{plan.training:8.2f} GiB")
    if plan.loading:
        lines.append(f"  {'peak while the UNet loads':<32}{plan.loading:8.2f} GiB (its file mapped beside the loaded weights)")
    return lines


def lora_variant(base: Setup, options) -> Setup:
    """The same run as a LoRA of the config's rank and targets (or as a full fine-tune, from a LoRA config)."""
    if base.lora:
        return replace(base, lora_rank=None)
    if base.sharded:  # a LoRA trains under DDP (FSDP refuses it)
        base = replace(base, strategy="ddp")
    rank = int(options.lora.get("rank", 16)) if options.lora.enabled else int((options.model.section.get("lora") or {}).get("rank", 16))
    return replace(base, lora_rank=rank)


def plan_report(options, processes: int, memories: list[float], device: str, effective_batch: int | None = None) -> str:
    """The config's breakdown, and for each memory size the setups that fit (fastest first), as text."""
    shapes, folder = model_shapes(options.model.pretrained)
    base = replace(setup_of(options, device, processes), unet_file_bytes=unet_file_bytes(folder))
    unit = "GPU" if device == "cuda" else "process"
    effective = effective_batch or base.batch * base.accumulation * processes
    plan = predict(shapes, base)
    where = f"{processes} {unit}s ({base.strategy})" if processes > 1 else f"1 {unit}"
    lines = [f"{options.train.config_name} on {where}:", *breakdown(base, plan, shapes, unit)]
    if device == "cuda":
        lines.append(f"  a card needs peak × {FRAGMENTATION} + {RESERVE_GIB:.1f} GiB (allocator slack, CUDA context): "
                     f"{plan.peak * FRAGMENTATION + RESERVE_GIB:.1f} GiB")
    for memory in memories:
        lines += ["", f"On {memory:g} GiB per {unit}, {effective} images per update:"]
        if device == "cuda":
            lines.append(f"  this config {'fits' if fits(plan, memory) else 'does not fit'}")
        for kind in (base, lora_variant(base, options)):
            fitting = ranked(shapes, kind, memory, effective)
            label = "LoRA" if kind.lora else "full fine-tune"
            if not fitting:
                lines.append(f"  {label}: nothing fits (batch 1 with every lever: "
                             f"{min(predict(shapes, s).peak for s in candidates(kind, effective)):.1f} GiB)")
                continue
            lines.append(f"  {label}, the fastest that fit first:")
            for setup, predicted in fitting[:4]:
                lines.append(f"    {predicted.peak:6.1f} GiB  {describe(setup)}; batch {setup.batch} × {setup.accumulation}")
            lines.append(f"    --cfg-options {' '.join(fitting[0][0].levers())}")
    return "\n".join(lines)


def warn_if_too_large(options, processes: int) -> None:
    """One line at the start of a GPU run whose predicted peak exceeds the card (never stops the run)."""
    import torch

    try:
        memory = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / GIB
        shapes, folder = model_shapes(options.model.pretrained)
        plan = predict(shapes, replace(setup_of(options, "cuda", processes), unet_file_bytes=unet_file_bytes(folder)))
    except Exception as error:  # noqa: BLE001 — a plan is advice: whatever stops it must not stop the run
        logger.debug("no memory plan: %s", error)
        return
    if not fits(plan, memory):
        logger.warning("predicted peak %.1f GiB per GPU (+ context) exceeds this card's %.1f GiB: `pgv25 plan %s "
                       "--gpu-memory %.0f` lists the levers that fit", plan.peak, memory, options.train.config_name, memory)
