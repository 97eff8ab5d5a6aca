"""From a config to the named parts a Trainer runs: runtime, data, model, objective, optimisation.

One function per part, each raising its own one-line `UserError`s. The order is the runner's and
matters: data before model (a wrong column or an empty dataset fails before gigabytes load), model
before objective (the objective wraps the UNet), objective before optimisation (DDP wraps the
objective module; FSDP shards the UNet inside it before the optimizer sees its parameters).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

import torch

from ..data.cache import CachedLatentDataset, ensure_cache
from ..data.dataset import DataPlan, build_dataset, plan_data
from ..data.multi import SHARED
from ..data.streaming import StreamingBucketDataset, check_streaming
from ..errors import UserError
from ..models.edm_denoiser import Conditioning
from ..models.float8 import enable_float8
from ..models.latent_codec import LatentCodec
from ..models.loading import load_components, resolve_pretrained
from ..models.lora import add_lora, add_text_lora, check_lora_fits, load_lora_weights
from ..models.speed import compile_unet, on_device
from ..models.text_conditioner import TextConditioner
from . import distributed
from ..files import DTYPES
from .optim import build_lr_scheduler, build_optimizer
from .param_update import ParamUpdates, keep_fp32_state_on_load
from .prior_data import add_class_images, class_images_plan

logger = logging.getLogger("pgv25")


@dataclass
class Runtime:
    """accelerate's view of where this process runs, and the precision it trains in."""

    accelerator: object
    strategy: str  # 'ddp' | 'fsdp'
    mixed_precision: str  # 'no' on a CPU
    weight_dtype: torch.dtype  # of the frozen text encoders
    vae_dtype: torch.dtype
    unet_dtype: torch.dtype = torch.float32  # the UNet's stored weights: trained (model.trained_dtype) or, under a LoRA, frozen

    def autocast(self):
        """The forward's autocast: accelerate's for mixed precision; when the UNet's weights are stored in bf16 (or
        fp16) without it (a CPU, or mixed_precision='no'), autocast to that dtype, so that fp32 inputs meet them."""
        if self.mixed_precision != "no" or self.unet_dtype == torch.float32:
            return self.accelerator.autocast()
        return torch.autocast(self.device.type, dtype=self.unet_dtype)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    @property
    def sharded(self) -> bool:
        return self.strategy == "fsdp" and self.world_size > 1


def build_runtime(options, work_dir, trackers: list[str] | None = None) -> Runtime:
    """accelerate's Accelerator for `options` (engine.options.RunOptions); `trackers` default to the options'."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed

    strategy = options.runtime.strategy
    on_gpu = torch.cuda.is_available()
    mixed_precision = options.runtime.mixed_precision if on_gpu else "no"  # fp32 on a CPU
    if strategy == "fsdp" and mixed_precision == "fp16":
        raise UserError("strategy 'fsdp' with fp16 is not supported (no sharded loss scaling); use mixed_precision='bf16'")
    accelerator = Accelerator(
        mixed_precision=mixed_precision,
        cpu=not on_gpu,  # under torchrun without CUDA this gives real gloo training, not N lone processes
        log_with=list(options.trackers if trackers is None else trackers),
        # TensorBoard under work_dir/tensorboard/pgv25; W&B project 'pgv25', run named after the config
        project_config=ProjectConfiguration(project_dir=str(work_dir), logging_dir=str(work_dir / "tensorboard")),
    )
    set_seed(options.train.seed)
    weight_dtype = DTYPES[options.model.weight_dtype] if on_gpu else torch.float32
    vae_dtype = DTYPES[options.model.vae_dtype] if on_gpu else torch.float32
    runtime = Runtime(accelerator, strategy, mixed_precision, weight_dtype, vae_dtype, unet_dtype(options, mixed_precision))
    if options.optim.fused_backward and runtime.world_size > 1:
        raise UserError("optim_wrapper.fused_backward runs on one process: DDP averages the gradients at the end of "
                        "backward, after the updates inside it would have used this process's own; train on one GPU, "
                        "or set fused_backward=False")
    if runtime.sharded and options.optim.type == "AdamW8bit":
        # bitsandbytes' update kernels have no rule for FSDP's sharded (DTensor) parameters: said before any loading
        raise UserError("optimizer AdamW8bit with strategy='fsdp' is not supported (bitsandbytes cannot update sharded "
                        "parameters); use strategy='ddp' with AdamW8bit, or AdamW/Adafactor with fsdp")
    return runtime


def unet_dtype(options, mixed_precision: str) -> torch.dtype:
    """The dtype the UNet's weights are stored in: model.trained_dtype for a full fine-tune; under a LoRA,
    model.frozen_dtype ('auto': the mixed-precision dtype, so fp32 on a CPU or with mixed_precision='no')."""
    if not options.lora.enabled:
        return DTYPES[options.model.trained_dtype]
    frozen = options.model.frozen_dtype
    if frozen == "auto":
        frozen = mixed_precision if mixed_precision in ("bf16", "fp16") else "fp32"
    return DTYPES[frozen]


@dataclass
class DataParts:
    dataset: torch.utils.data.Dataset
    plan: DataPlan | None  # None when streaming: rows are bucketed as they arrive
    batch_size: int  # per process
    cached: bool  # samples are latents and text embeddings from the cache
    held_out: list = field(default_factory=list)  # the validation loss's (name, dataset, plan) (engine/validation_loss.py)

    @property
    def streaming(self) -> bool:
        return self.plan is None


def build_data(options, runtime: Runtime) -> DataParts:
    """The dataset (scanned, bucketed, cached when configured); the base pipeline resolved on the way."""
    accelerator, seed, data = runtime.accelerator, options.train.seed, options.data
    data_cfg, model_name, batch_size = data.dataset, options.model.pretrained, data.batch_size
    # One process per machine downloads / builds / caches; the others then read its copy.
    with accelerator.local_main_process_first():
        if data.tiny_assets:
            from ..tiny import ensure_tiny_assets

            ensure_tiny_assets(**data.tiny_assets)
        if data.tiny_dreambooth:  # the tiny DreamBooth config's instance images, from the shapes above
            from ..tiny.dreambooth import ensure_instance_images

            ensure_instance_images(**data.tiny_dreambooth)
        plan = None
        if data_cfg.get("streaming"):  # no scan: rows are bucketed as they arrive (data/streaming.py)
            check_streaming(data_cfg)
            dataset = StreamingBucketDataset(data_cfg, batch_size, seed, runtime.rank, runtime.world_size)
        else:
            plan = plan_data(data_cfg, batch_size * runtime.world_size, holdout=options.validation.loss.holdout)
        resolve_pretrained(model_name)  # one download per machine
    if options.objective["type"] == "prior_preservation":  # DreamBooth: class images drawn by the base model, then planned
        data_cfg, plan = add_class_images(data_cfg, plan, options.objective, runtime, model_name,
                                          batch_size * runtime.world_size, holdout=options.validation.loss.holdout)
    with accelerator.local_main_process_first():
        held_plans = held_out_plans(options, data_cfg, plan)
    cached = data.cached

    def dataset_of(plan: DataPlan, cfg: dict):
        """From the latent cache (built here first if missing; then neither the VAE nor the text encoders are loaded)."""
        if not cached:
            return build_dataset(cfg, plan, seed)
        folder = ensure_cache(plan, cfg, model_name, seed, runtime.device, runtime.weight_dtype, runtime.vae_dtype,
                              runtime.rank, runtime.world_size, accelerator.wait_for_everyone,
                              distributed.broadcast_object, options.train.config_name)
        return CachedLatentDataset(folder, plan, cfg.get("caption_dropout", 0.0), seed)

    if plan is not None:
        dataset = dataset_of(plan, data_cfg)
    # The held-out images as fixed samples: no caption dropout, no random crop or flip (a cache stores one crop)
    fixed = {**data_cfg, "caption_dropout": 0.0, "center_crop": True, "random_flip": False}
    held = [(name, dataset_of(held_plan, fixed), held_plan) for name, held_plan in held_plans]
    return DataParts(dataset, plan, batch_size, cached, held)


def held_out_plans(options, data_cfg: dict, plan: DataPlan | None) -> list[tuple[str, DataPlan]]:
    """What the validation loss measures, by name: the held-out images ('val_loss': split off the training plan, or a
    dataset of its own over the shared settings) and, with prior preservation, the class images ('val_loss_class')."""
    loss = options.validation.loss
    if not loss.enabled:
        return []
    held = []
    if loss.dataset:
        shared = {k: data_cfg[k] for k in SHARED if k in data_cfg}
        held.append(("val_loss", plan_data({**shared, **loss.dataset}, 1, "validation.loss.dataset")))
    elif loss.split:
        held.append(("val_loss", plan.held_out))
    if options.objective["type"] == "prior_preservation":
        held.append(("val_loss_class", class_images_plan(data_cfg, options.objective)))
    return held


@dataclass
class ModelParts:
    """The UNet (with its adapters), and what turns a batch into its inputs: VAE and text encoders
    (None when training from the latent cache)."""

    unet: torch.nn.Module
    trained: torch.nn.Module  # all that trains, as one module: the UNet, or it and the text encoders' LoRA
    conditioner: TextConditioner | None
    codec: LatentCodec | None
    base_folder: str
    scheduler_config: dict
    lora: dict | None  # model.lora when enabled
    text_lora: bool
    cond_dtype: torch.dtype

    def inputs(self, batch: dict, device: torch.device, generator: torch.Generator) -> tuple[torch.Tensor, Conditioning]:
        """Latents x0 and their conditioning, from the cache or by encoding pixels and captions."""
        if "latents" in batch:  # from the latent cache
            x0 = batch["latents"].to(device, torch.float32, non_blocking=True)
            prompt_embeds = batch["prompt_embeds"].to(device, self.cond_dtype, non_blocking=True)
            pooled = batch["pooled"].to(device, self.cond_dtype, non_blocking=True)
        else:
            x0 = self.codec.encode(batch["pixels"].to(device, non_blocking=True), generator)
            prompt_embeds, pooled = self.conditioner(batch["caption"], batch["drop_caption"])
        return x0, Conditioning(prompt_embeds, pooled, batch["time_ids"].to(device, prompt_embeds.dtype))


def build_model(options, runtime: Runtime, cached: bool, buckets: int) -> ModelParts:
    """Load the pipeline's parts; add LoRA, gradient checkpointing, channels-last and compile as configured."""
    model_options, device = options.model, runtime.device
    lora, init = options.lora.settings, options.lora.init  # rank, alpha, targets filled in from an init_from file
    with runtime.accelerator.local_main_process_first():
        if init is not None:  # a LoRA of another architecture fails here, before gigabytes of weights load
            folder = resolve_pretrained(model_options.pretrained)
            check_lora_fits(init, json.loads((folder / "unet" / "config.json").read_text()))
        parts = load_components(model_options.pretrained, runtime.weight_dtype, encoders=not cached, unet_dtype=runtime.unet_dtype)
    conditioner = codec = None
    if not cached:
        conditioner = TextConditioner(
            [parts.tokenizer, parts.tokenizer_2], [parts.text_encoder, parts.text_encoder_2], parts.force_zeros_for_empty_prompt
        ).to(device)
        codec = LatentCodec(parts.vae.to(device, runtime.vae_dtype)).to(device)
    unet = parts.unet.train()  # loaded in runtime.unet_dtype: the trained weights, or under a LoRA the frozen ones
    if lora is not None and runtime.sharded:
        raise UserError("model.lora with strategy='fsdp' is not supported; LoRA weights are small: use strategy='ddp'")
    if lora is not None:
        trainable = add_lora(unet, lora)
        for p in unet.parameters():  # the adapters train in fp32 over a frozen base of any dtype
            if p.requires_grad:
                p.data = p.data.float()
        if init is not None:
            load_lora_weights(unet, init, "unet")
            logger.info("LoRA starts from %s", init.path)
        logger.info("LoRA rank %d (alpha %s) on %s: %.2fM trainable parameters", lora.get("rank", 16),
                    lora.get("alpha", lora.get("rank", 16)), sorted(unet.peft_config["default"].target_modules), trainable / 1e6)
    trained, text_lora = unet, bool(lora and lora.get("text_encoders"))
    if text_lora:
        if cached:
            raise UserError("model.lora.text_encoders trains the text encoders: captions must be encoded every step; "
                            "set train_dataloader.dataset.cache.enabled=False")
        if lora.get("fuse_export"):
            raise UserError("model.lora.fuse_export folds the UNet's LoRA only; with model.lora.text_encoders=True "
                            "use the LoRA file (pipe.load_lora_weights)")
        encoders = list(conditioner.text_encoders)
        count = add_text_lora(encoders, lora)
        if init is not None:
            for name, encoder in zip(("text_encoder", "text_encoder_2"), encoders):
                load_lora_weights(encoder, init, name)
        logger.info("LoRA on both text encoders: %.2fM trainable parameters", count / 1e6)
        trained = torch.nn.ModuleDict({"unet": unet, "text_encoder": encoders[0], "text_encoder_2": encoders[1]})
    if model_options.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if on_device(model_options.channels_last, device, "model.channels_last"):  # NHWC convolutions for tensor cores
        unet.to(memory_format=torch.channels_last)
    if model_options.float8:  # before compiling: the compiled blocks trace the float8 layers
        enable_float8(unet, model_options.float8, device)
    compile_unet(unet, model_options.compile, buckets, device, runtime.sharded)
    return ModelParts(unet, trained, conditioner, codec, parts.source, parts.scheduler_config, lora, text_lora,
                      runtime.weight_dtype)


@dataclass
class Optimisation:
    step_module: torch.nn.Module  # the objective as prepared by accelerate (DDP-wrapped on several processes)
    optimizer: object  # accelerate's wrapper; `.optimizer` is torch's
    lr_scheduler: object
    trained_params: list  # what the optimizer updates and the gradient norm covers
    text_params: list  # text-encoder LoRA parameters: outside the DDP module, averaged by hand
    clip_norm: float  # inf: measure the gradient norm, never clip
    accumulation: int  # micro-batches per update
    updates: ParamUpdates  # how the update reaches the weights: at once, per parameter in fp32 + rounding, in backward


ROUNDING_SEED = 0x5EED  # offsets the stochastic-rounding generator's seed from the data and noise generators'


def build_optimisation(options, runtime: Runtime, model: ModelParts, objective: torch.nn.Module) -> Optimisation:
    optim, unet = options.optim, model.unet
    if runtime.sharded:  # shard first: the optimizer must see the sharded parameters
        unet.to(runtime.device)
        distributed.shard_unet(unet, {"bf16": torch.bfloat16}.get(runtime.mixed_precision), options.runtime.reshard_after_forward)
    # after sharding: FSDP replaces the parameters with sharded ones, which the optimizer must hold
    trained_params = [p for p in model.trained.parameters() if p.requires_grad]
    unet_params = {id(p) for p in unet.parameters()}
    text_params = [p for p in trained_params if id(p) not in unet_params]
    optimizer = build_optimizer(trained_params, optim.optimizer, on_cuda=runtime.device.type == "cuda", sharded=runtime.sharded)
    lr_scheduler = build_lr_scheduler(optimizer, optim.scheduler, options.train.max_iters)
    rounding = optim.rounding if any(p.dtype != torch.float32 for p in trained_params) else None
    generator = None
    if rounding == "stochastic":  # its own stream, saved in every checkpoint (rng.pt): a resume rounds the same
        generator = torch.Generator(runtime.device).manual_seed(options.train.seed * 1_000_003 + ROUNDING_SEED + runtime.rank)
    if rounding is not None:
        keep_fp32_state_on_load(optimizer)
    updates = ParamUpdates(optimizer, trained_params, rounding, generator)
    if optim.fused_backward:
        updates.fuse_into_backward()
    if runtime.sharded:
        step_module, optimizer = objective, runtime.accelerator.prepare(optimizer)
    else:
        step_module, optimizer = runtime.accelerator.prepare(objective, optimizer)
    return Optimisation(step_module, optimizer, lr_scheduler, trained_params, text_params, optim.clip_norm, optim.accumulation,
                        updates)
