"""The run's options, read from the config once, before anything loads.

Each section the runner and its parts use is parsed here into a small frozen dataclass, with its
defaults and its one-line errors: a wrong key or value fails at start-up, and the rest of the engine
takes these objects instead of reaching into the config. Sections owned by a part parse with that
part's own function (the objective with `objective_options`, captions with `caption_options`, the
latent cache with `cache_options`, the LoRA file with `lora_init`), called once, here.

The model's σ sampling and loss weighting are parsed by the noise schedule (objectives/schedule.py), which
the objective owns, from `ModelOptions.section`; the resume fingerprint (engine/resume.py) hashes raw
config sections on purpose.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..data.cache import cache_options
from ..data.captions import CaptionOptions, caption_options
from ..data.multi import dataset_config
from ..errors import UserError
from ..files import DTYPES
from ..generate import PromptSpec, prompt_specs
from ..models.float8 import float8_setting
from ..models.lora import lora_init
from ..models.speed import ATTENTION_BACKENDS
from ..objectives import objective_options
from .distributed import check_strategy
from .optim import PER_GROUP_OPTIMIZERS, optimizer_type
from .param_update import ROUNDINGS

TRACKERS = ("tensorboard", "wandb")


@dataclass(frozen=True)
class TrainOptions:
    """`train_cfg`, `default_hooks`, `randomness`, `work_dir`: how long, how often to log and save, where."""

    config_name: str
    work_dir: Path
    max_iters: int
    max_nonfinite: int  # consecutive skipped updates before the run stops
    log_every: int
    save_every: int
    max_keep: int | None  # checkpoints kept (None: all)
    seed: int


@dataclass(frozen=True)
class RuntimeOptions:
    """`strategy`, `fsdp` and the precision of `optim_wrapper`: how the UNet is spread over processes."""

    strategy: str  # 'ddp' | 'fsdp'
    mixed_precision: str  # as configured ('no', 'fp16', 'bf16'); a CPU trains in fp32 whatever it says
    reshard_after_forward: bool  # FSDP: free the gathered weights after each block's forward


@dataclass(frozen=True)
class OptimOptions:
    """`optim_wrapper` and `param_scheduler`: the optimizer (engine/optim.py builds it), its schedule, clipping and
    gradient accumulation."""

    optimizer: dict  # `type` and the optimizer's keyword arguments
    scheduler: dict  # `type`, `warmup_iters` and the schedule's keyword arguments
    clip_norm: float  # inf: measure the gradient norm, never clip
    accumulation: int  # micro-batches per update
    rounding: str | None = None  # how updates reach bf16 trained weights ('stochastic', 'nearest'); None: fp32 weights
    fused_backward: bool = False  # each parameter updated inside backward, its gradient freed at once

    @property
    def type(self) -> str:
        return self.optimizer.get("type", "AdamW")

    @property
    def lr(self) -> float:
        return self.optimizer.get("lr")


@dataclass(frozen=True)
class DataOptions:
    """`train_dataloader`: the dataset section (several datasets folded under `parts`), batch and workers."""

    dataset: dict
    batch_size: int  # per process
    num_workers: int
    captions: CaptionOptions
    cached: bool  # train from the latent cache
    tiny_assets: dict | None  # the embedded default's generated assets, built on first use
    tiny_dreambooth: dict | None

    @property
    def resolution(self):
        return self.dataset.get("resolution")


@dataclass(frozen=True)
class ModelOptions:
    """`model`: the base pipeline and the switches that trade memory or time (the trained function is the same)."""

    pretrained: str
    weight_dtype: str  # of the frozen text encoders (GPU only)
    vae_dtype: str
    attention_backend: str | None  # the SDPA kernel tried first (None: PyTorch's order)
    gradient_checkpointing: bool
    channels_last: object  # True, False or 'cuda'
    compile: dict
    section: dict = field(repr=False)  # the whole section, for the noise schedule (objectives/schedule.py)
    trained_dtype: str = "fp32"  # of the trained UNet weights in a full fine-tune ('bf16': see engine/param_update.py)
    frozen_dtype: str = "auto"  # of the frozen UNet under a LoRA ('auto': the mixed-precision dtype on a GPU, else fp32)
    float8: str | None = None  # the transformer blocks' linear layers in float8: 'native', 'emulate' (models/float8.py)


@dataclass(frozen=True)
class LoraOptions:
    """`model.lora`: None settings when LoRA is off; rank, alpha and targets filled in from `init_from`."""

    settings: dict | None
    init: object | None  # models.lora_files.LoraFile to start from

    @property
    def enabled(self) -> bool:
        return self.settings is not None

    def get(self, key: str, default=None):
        return (self.settings or {}).get(key, default)


@dataclass(frozen=True)
class ExportOptions:
    """`export`: the dtype of exported weights and the optional single file for ComfyUI/A1111."""

    dtype: str = "fp32"
    single_file: bool = False
    single_file_dtype: str = "fp16"


@dataclass(frozen=True)
class EmaOptions:
    settings: dict | None  # for engine/ema.py's EMA; None when off
    export: str = "ema"  # which weights the exports carry: 'ema' or 'model'


@dataclass(frozen=True)
class ValidationLossOptions:
    """`validation.loss`: the loss on held-out images at a fixed σ grid with fixed noise, every `interval` iterations."""

    interval: int  # 0: off
    split: float  # the fraction of the training images held out (by a hash of each image's name)
    dataset: dict | None  # or a dataset of its own, over train_dataloader.dataset's shared settings
    sigmas: tuple[float, ...]
    batch_size: int
    max_images: int
    seed: int  # of the fixed noise

    @property
    def enabled(self) -> bool:
        return self.interval > 0

    @property
    def holdout(self) -> float:
        """The fraction the training plan leaves out (0 when off or when a dataset of its own is given)."""
        return self.split if self.enabled and not self.dataset else 0.0


@dataclass(frozen=True)
class ValidationOptions:
    """`validation`: grids from the model being trained, every `interval` iterations, and the held-out loss."""

    interval: int
    specs: tuple[PromptSpec, ...]
    scheduler: str
    raw_and_ema: bool
    loss: ValidationLossOptions


@dataclass(frozen=True)
class SampleGridOptions:
    """`sample_grid`: the grid made from the final export."""

    specs: tuple[PromptSpec, ...]
    scheduler: str


@dataclass(frozen=True)
class RunOptions:
    train: TrainOptions
    runtime: RuntimeOptions
    optim: OptimOptions
    data: DataOptions
    model: ModelOptions
    lora: LoraOptions
    export: ExportOptions
    objective: dict  # objectives.objective_options
    ema: EmaOptions
    validation: ValidationOptions
    sample_grid: SampleGridOptions
    trackers: tuple[str, ...]
    tracker_init: dict  # accelerate's init_kwargs per tracker
    card: dict  # `model_card`: title, tags, trigger words... of every export's README.md (engine/model_card.py)


def read_options(cfg) -> RunOptions:
    """Every section the runner uses, checked; the first mistake is a one-line UserError (in the order the checks
    ran before there was one place for them: objective, export and LoRA, prompts, then the rest)."""
    objective = objective_options(cfg)
    lora = lora_options(cfg)
    export = export_options(cfg, lora)
    resolution = cfg.train_dataloader.dataset.get("resolution")
    sample_grid, validation = sample_grid_options(cfg, resolution), validation_options(cfg, resolution)
    model = model_options(cfg)
    runtime, optim = runtime_options(cfg), optim_options(cfg, model.trained_dtype)
    check_low_precision(model, lora, runtime, optim)
    return RunOptions(
        train=train_options(cfg), runtime=runtime, optim=optim, data=data_options(cfg),
        model=model, lora=lora, export=export, objective=objective, ema=ema_options(cfg),
        validation=validation, sample_grid=sample_grid, trackers=trackers_of(cfg),
        tracker_init=tracker_options(cfg, work_dir_of(cfg)), card=dict(cfg.get("model_card") or {}),
    )


def work_dir_of(cfg) -> Path:
    return Path(cfg.get("work_dir") or Path("work_dirs") / cfg.config_name)


def train_options(cfg) -> TrainOptions:
    checkpoint = cfg.default_hooks.checkpoint
    return TrainOptions(
        config_name=cfg.config_name, work_dir=work_dir_of(cfg), max_iters=int(cfg.train_cfg.max_iters),
        max_nonfinite=int(cfg.train_cfg.get("max_nonfinite_iters", 5)), log_every=int(cfg.default_hooks.logger.interval),
        save_every=int(checkpoint.interval), max_keep=checkpoint.get("max_keep_ckpts"), seed=int(cfg.randomness.seed),
    )


def runtime_options(cfg) -> RuntimeOptions:
    strategy = check_strategy(cfg.get("strategy", "ddp"))
    mixed_precision = str(cfg.optim_wrapper.get("mixed_precision", "no"))
    if mixed_precision not in ("no", "fp16", "bf16"):
        raise UserError(f"optim_wrapper.mixed_precision must be 'no', 'fp16' or 'bf16', got {mixed_precision!r}")
    return RuntimeOptions(strategy, mixed_precision, bool((cfg.get("fsdp") or {}).get("reshard_after_forward", True)))


def optim_options(cfg, trained_dtype: str = "fp32") -> OptimOptions:
    wrapper = cfg.optim_wrapper
    optimizer = dict(wrapper.optimizer)
    optimizer_type(optimizer)  # the rest of its keys are checked by the optimizer itself, when it is built
    accumulation = wrapper.get("accumulative_counts", 1)
    if not isinstance(accumulation, int) or isinstance(accumulation, bool) or accumulation < 1:
        raise UserError(f"optim_wrapper.accumulative_counts must be a positive integer, got {accumulation!r}")
    clip_norm = (wrapper.get("clip_grad") or {}).get("max_norm") or math.inf
    rounding = wrapper.get("rounding", "stochastic")
    if rounding not in ROUNDINGS:
        raise UserError(f"optim_wrapper.rounding must be one of {', '.join(ROUNDINGS)}, got {rounding!r}")
    fused = wrapper.get("fused_backward", False)
    if not isinstance(fused, bool):
        raise UserError(f"optim_wrapper.fused_backward must be True or False, got {fused!r}")
    return OptimOptions(optimizer, dict(cfg.get("param_scheduler") or {}), float(clip_norm), accumulation,
                        rounding if trained_dtype != "fp32" else None, fused)


def check_low_precision(model: ModelOptions, lora: LoraOptions, runtime: RuntimeOptions, optim: OptimOptions) -> None:
    """What bf16 trained weights, the update inside backward and float8 cannot do, refused in one line before anything
    loads, each naming the alternative. (One process only for fused_backward: checked when the world size is known.)"""
    if model.float8 and lora.enabled:
        raise UserError("model.float8 applies to a full fine-tune: peft's LoRA layers wrap the linear layers float8 "
                        "would replace; set model.float8=False with a LoRA")
    if model.float8 and runtime.strategy == "fsdp":
        raise UserError("model.float8 with strategy='fsdp' is not supported yet (float8 weight all-gathers are not "
                        "wired); use strategy='ddp'")
    if model.trained_dtype != "fp32" and lora.enabled:
        raise UserError("model.trained_dtype applies to a full fine-tune; under a LoRA the adapters are small and stay "
                        "fp32: set model.frozen_dtype='bf16' for the frozen UNet instead")
    per_parameter = model.trained_dtype != "fp32" or optim.fused_backward
    what = "model.trained_dtype='bf16'" if model.trained_dtype != "fp32" else "optim_wrapper.fused_backward"
    if per_parameter and optim.type in PER_GROUP_OPTIMIZERS:
        raise UserError(f"{what} updates one parameter at a time, and optimizer {optim.type}'s step spans the whole "
                        f"group ({PER_GROUP_OPTIMIZERS[optim.type]}); use AdamW, AdamW8bit, Adafactor, Lion or CAME")
    if per_parameter and runtime.strategy == "fsdp":
        raise UserError(f"{what} with strategy='fsdp' is not supported; FSDP already shards the weights, gradients and "
                        "optimizer state: use one of them, not both")
    if model.trained_dtype != "fp32" and runtime.mixed_precision == "fp16":
        raise UserError("model.trained_dtype='bf16' computes in bf16: set optim_wrapper.mixed_precision='bf16' (or 'no')")
    if not optim.fused_backward:
        return
    if optim.accumulation > 1:
        raise UserError("optim_wrapper.fused_backward updates each weight inside backward, so no gradient is kept between "
                        "micro-batches: set accumulative_counts=1 (and a larger batch_size), or fused_backward=False")
    if runtime.mixed_precision == "fp16":
        raise UserError("optim_wrapper.fused_backward with mixed_precision='fp16' is not supported (the loss scale must be "
                        "checked before any weight is updated): use mixed_precision='bf16'")
    if math.isfinite(optim.clip_norm):
        raise UserError("optim_wrapper.fused_backward never holds all gradients at once, so it cannot clip their global "
                        "norm: set optim_wrapper.clip_grad=None (the norm is still logged), or fused_backward=False")


def data_options(cfg) -> DataOptions:
    loader = cfg.train_dataloader
    dataset = dataset_config(loader)
    return DataOptions(dataset, int(loader.batch_size), int(loader.get("num_workers", 0)), caption_options(loader.dataset),
                       cache_options(dataset)["enabled"], cfg.get("tiny_assets"), cfg.get("tiny_dreambooth"))


def model_options(cfg) -> ModelOptions:
    model = cfg.model
    backend = model.get("attention_backend")
    if backend not in (None, *ATTENTION_BACKENDS):
        raise UserError(f"model.attention_backend must be one of {', '.join(ATTENTION_BACKENDS)} or None, got {backend!r}")
    for key in ("weight_dtype", "vae_dtype"):
        if model.get(key, "fp32") not in DTYPES:
            raise UserError(f"model.{key} must be one of {', '.join(DTYPES)}, got {model.get(key)!r}")
    trained_dtype, frozen_dtype = model.get("trained_dtype", "fp32"), model.get("frozen_dtype", "auto")
    if trained_dtype not in ("fp32", "bf16"):
        raise UserError(f"model.trained_dtype must be 'fp32' or 'bf16', got {trained_dtype!r}")
    if frozen_dtype not in ("auto", *DTYPES):
        raise UserError(f"model.frozen_dtype must be 'auto' or one of {', '.join(DTYPES)}, got {frozen_dtype!r}")
    return ModelOptions(model.pretrained_model_name_or_path, model.get("weight_dtype", "fp32"), model.get("vae_dtype", "fp32"),
                        backend, bool(model.get("gradient_checkpointing")), model.get("channels_last"),
                        dict(model.get("compile") or {}), dict(model), trained_dtype, frozen_dtype,
                        float8_setting(model.get("float8", False)))


def lora_options(cfg) -> LoraOptions:
    settings, init = lora_init(dict(cfg.model.get("lora") or {}))  # rank, alpha, targets from an init_from file
    return LoraOptions(settings if settings.get("enabled") else None, init)


def export_options(cfg, lora: LoraOptions) -> ExportOptions:
    """`export` and the LoRA export switches."""
    options = dict(cfg.get("export") or {})
    for key in ("dtype", "single_file_dtype"):
        if options.get(key, "fp32") not in DTYPES:
            raise UserError(f"export.{key} must be one of {', '.join(DTYPES)}, got '{options[key]}'")
    if lora.enabled and options.get("single_file") and not lora.get("fuse_export"):
        raise UserError("export.single_file writes a whole model: with LoRA set model.lora.fuse_export=True too "
                        "(the file goes into step<N>_fused/), or use lora.kohya_export for ComfyUI's LoRA loader")
    if lora.enabled and lora.get("kohya_export") and (lora.get("use_dora") or lora.get("use_rslora")):
        raise UserError("model.lora.kohya_export: diffusers cannot read DoRA or rsLoRA back from a kohya file; "
                        "turn kohya_export off (the diffusers-format file carries them)")
    return ExportOptions(options.get("dtype", "fp32"), bool(options.get("single_file")), options.get("single_file_dtype", "fp16"))


def ema_options(cfg) -> EmaOptions:
    ema = dict(cfg.get("ema") or {})
    export = ema.get("export", "ema")
    if export not in ("ema", "model"):
        raise UserError(f"ema.export must be 'ema' or 'model', got '{export}'")
    if ema.get("enabled") and cfg.get("strategy", "ddp") == "fsdp":
        raise UserError("ema with strategy='fsdp' is not supported yet; use strategy='ddp' or disable ema")
    return EmaOptions(ema if ema.get("enabled") else None, export)


def validation_options(cfg, resolution) -> ValidationOptions:
    options = cfg.get("validation") or {}
    defaults = {"seed": int(options.get("seed", 0)), "steps": int(options.get("steps", 25)),
                "guidance_scale": float(options.get("guidance_scale", 3.0)), "negative_prompt": options.get("negative_prompt"),
                "width": options.get("width") or resolution, "height": options.get("height") or resolution}
    specs = prompt_specs(options.get("prompts"), defaults, "validation.prompts")
    return ValidationOptions(int(options.get("interval", 0) or 0), tuple(specs), options.get("scheduler", "dpmpp"),
                             bool(options.get("raw_and_ema", True)), validation_loss_options(cfg))


SIGMA_GRID = (0.02, 0.06, 0.17, 0.5, 1.4, 4.0, 11.0, 80.0)  # 8 σ from near-clean to Playground's σ_max, about ×3 apart


def validation_loss_options(cfg) -> ValidationLossOptions:
    key = "validation.loss"
    options = dict((cfg.get("validation") or {}).get("loss") or {})
    unknown = sorted(set(options) - {"interval", "split", "dataset", "sigmas", "batch_size", "max_images", "seed"})
    if unknown:
        raise UserError(f"{key}: unknown key {unknown[0]!r} (interval, split, dataset, sigmas, batch_size, max_images, seed)")
    interval, split = options.get("interval", 0) or 0, options.get("split", 0.0) or 0.0
    sigmas = options.get("sigmas") or SIGMA_GRID
    dataset = dict(options.get("dataset") or {}) or None
    batch_size, max_images = options.get("batch_size", 8), options.get("max_images", 256)
    if not isinstance(interval, int) or interval < 0:
        raise UserError(f"{key}.interval must be a whole number of iterations (0: off), got {interval!r}")
    if not isinstance(split, (int, float)) or not 0 <= split < 1:
        raise UserError(f"{key}.split must be a fraction in [0, 1), got {split!r}")
    try:
        sigmas = tuple(float(s) for s in sigmas)
    except (TypeError, ValueError):
        sigmas = ()
    if not sigmas or not all(0 < s < float("inf") for s in sigmas):
        raise UserError(f"{key}.sigmas must be a list of positive noise levels σ (e.g. {list(SIGMA_GRID)}), got {options.get('sigmas')!r}")
    for name, value in (("batch_size", batch_size), ("max_images", max_images)):
        if not isinstance(value, int) or value < 1:
            raise UserError(f"{key}.{name} must be a positive whole number, got {value!r}")
    parsed = ValidationLossOptions(interval, float(split), dataset, sigmas, batch_size, max_images, int(options.get("seed", 0)))
    if not parsed.enabled:
        return parsed
    objective = (cfg.get("objective") or {}).get("type", "denoising")
    data = cfg.train_dataloader.dataset
    if objective == "dpo":
        raise UserError(f"{key} is not measured for preference pairs yet (objective.type='dpo'); set {key}.interval=0")
    if not split and not dataset and objective != "prior_preservation":  # DreamBooth measures its class images anyway
        raise UserError(f"{key}.interval={interval} needs held-out images: {key}.split (a fraction of the training images, "
                        f"e.g. 0.05) or {key}.dataset (dict(type=..., path=...))")
    if data.get("streaming") or (dataset or {}).get("streaming"):
        raise UserError(f"{key} needs a scanned dataset: not with streaming=True; set {key}.interval=0 or streaming=False")
    if cfg.get("strategy", "ddp") == "fsdp":
        raise UserError(f"{key} with strategy='fsdp' is not supported yet (each rank would run a different number of "
                        f"sharded forwards); use strategy='ddp' or set {key}.interval=0")
    return parsed


def sample_grid_options(cfg, resolution) -> SampleGridOptions:
    """`sample_grid.prompts` as PromptSpecs (strings or per-prompt dicts), defaults from `sample_grid`."""
    options = cfg.get("sample_grid") or {}
    defaults = {"seed": options.get("seed", 0), "steps": options.get("steps", 50), "guidance_scale": options.get("guidance_scale", 3.0),
                "negative_prompt": options.get("negative_prompt"), "width": options.get("width") or resolution,
                "height": options.get("height") or resolution}
    return SampleGridOptions(tuple(prompt_specs(options.get("prompts"), defaults, "sample_grid.prompts")),
                             options.get("scheduler", "dpmpp"))


def trackers_of(cfg) -> tuple[str, ...]:
    """`log_with`: TensorBoard always; 'wandb' when asked for and installed (one line if not)."""
    wanted = tuple(dict.fromkeys(["tensorboard", *(cfg.get("log_with") or [])]))
    unknown = [t for t in wanted if t not in TRACKERS]
    if unknown:
        raise UserError(f"log_with: unknown tracker {unknown[0]!r} (choose from 'tensorboard', 'wandb')")
    if "wandb" in wanted:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise UserError("log_with=['wandb'] needs Weights & Biases: pip install 'pgv25[wandb]'") from None
    return wanted


def tracker_options(cfg, work_dir: Path) -> dict:
    """W&B offline unless a key is configured (WANDB_API_KEY) or WANDB_MODE says otherwise: a machine
    without network or login still trains, and `wandb sync work_dir/wandb` uploads later."""
    wandb_cfg = dict(cfg.get("wandb") or {})
    mode = os.environ.get("WANDB_MODE") or wandb_cfg.pop("mode", None) or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    return {"wandb": {"mode": mode, "dir": str(work_dir), "name": cfg.config_name, **wandb_cfg}}
