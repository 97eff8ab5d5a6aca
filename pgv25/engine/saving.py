"""Saving a run: the resumable checkpoint, the export beside it (a diffusers pipeline, or a LoRA file
with its kohya twin and fused pipeline), the room they need, and the sample grid from the last export.

All ranks gather the weights and optimizer state (FSDP holds them in shards); rank 0 writes. A failed
write raises the same one-line error on every rank, so none waits for the others.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch

from ..errors import UserError
from ..files import DTYPES
from ..generate import generate_specs, labelled_grid, load_pipeline
from ..models.lora import fused_unet_state, save_lora
from ..models.lora_files import KOHYA_FILE, LORA_FILE, write_kohya
from . import distributed
from .checkpoint import rng_state, save_checkpoint
from .export import atomic_folder, export_pipeline, single_file_name
from .model_card import card_of_run, write_card
from .optim import eval_weights, schedule_free

logger = logging.getLogger("pgv25")


def free_bytes(folder: Path) -> int:
    """Free space of the filesystem that holds `folder` (a function of its own so tests can shrink it)."""
    return shutil.disk_usage(folder).free


def tensor_bytes(value) -> int:
    """Bytes of every tensor in a (nested) state dict."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v) for v in value)
    return 0


def save(trainer, export: bool = True) -> tuple[Path | None, Path | None]:
    """A resumable checkpoint and (optionally) an export of `trainer` at its iteration: (checkpoint, step dir).

    When the work dir's filesystem has no room for them, the save is skipped with a line saying so ((None, None));
    a second skip in a row stops the run. Nothing is deleted to make room.
    """
    model_state = distributed.full_model_state(trainer.trained, trainable_only=trainer.lora is not None)
    optimizer_state = distributed.full_optimizer_state(trainer.trained, trainer.optim.optimizer.optimizer)
    export_state = None  # the weights an export holds, when they are not the trained ones
    if export and schedule_free(trainer.optim.optimizer.optimizer):  # its average, gathered like the rest (a collective)
        with eval_weights(trainer.optim.optimizer.optimizer, trainer.optim.trained_params):
            export_state = {k: v.clone() for k, v in
                            distributed.full_model_state(trainer.trained, trainable_only=trainer.lora is not None).items()}
    main = trainer.accelerator.is_main_process
    no_room = distributed.broadcast_object(no_room_for(trainer, model_state, optimizer_state, export) if main else None)
    if no_room:
        trainer.skipped_saves += 1
        if trainer.skipped_saves >= 2:
            raise UserError(f"{no_room}; stopped after two saves in a row could not be written "
                            f"(the last checkpoint written is intact); free space and resume with --resume")
        logger.warning("%s; this save is skipped and training goes on to the next one", no_room)
        return None, None
    trainer.skipped_saves = 0
    batches = trainer.batches
    ranks = distributed.gather_objects({"consumed": batches.consumed, "skipped": batches.skipped,
                                        "rng": rng_state(trainer.generator, trainer.optim.updates.generator), "stream": batches.stream or None})
    checkpoint = trainer.work_dir / "checkpoints" / f"iter_{trainer.iteration:07d}"
    step_dir = trainer.work_dir / f"step{trainer.iteration}" if export else None
    error = None
    if main:
        try:
            checkpoint = _write(trainer, checkpoint, step_dir, model_state, optimizer_state, ranks, export_state)
        except UserError as failure:
            error = str(failure)
    error = distributed.broadcast_object(error)
    if error:
        raise UserError(error)
    return checkpoint, step_dir


def _write(trainer, checkpoint: Path, step_dir: Path | None, model_state: dict, optimizer_state: dict, ranks: list,
           export_state: dict | None = None) -> Path:
    """Rank 0: the checkpoint folder, then the export made from the same weights (a schedule-free optimizer's average:
    `export_state`; the EMA's when it is exported)."""
    bad = [name for name, value in model_state.items() if not torch.isfinite(value).all()]
    if bad:  # cannot happen past the non-finite guard; never write such weights if it does
        raise UserError(f"iteration {trainer.iteration}: refusing to save non-finite weights ({bad[0]}, ...)")
    scaler, ema = trainer.accelerator.scaler, trainer.ema
    parts = {
        "optimizer": optimizer_state, "lr_scheduler": trainer.optim.lr_scheduler.state_dict(),
        "grad_scaler": scaler.state_dict() if scaler is not None else None,
        "rng": {"ranks": [r.pop("rng") for r in ranks]},
        "ema": ema.state() if ema is not None else None,
    }
    trainer_state = {
        "ranks": ranks, "world_size": trainer.world_size, "nonfinite_skipped": trainer.nonfinite_total,
        "config": trainer.options.train.config_name, "fingerprint": trainer.fingerprint,
        "ema_updates": ema.updates if ema is not None else None,
    }
    checkpoint = save_checkpoint(checkpoint.parent, trainer.iteration, model_state, parts, trainer_state,
                                 trainer.options.train.max_keep)
    exported = ""
    if step_dir is not None:
        dtype = trainer.options.export.dtype
        use_ema = ema is not None and trainer.options.ema.export == "ema"
        exported_state = export_state or model_state
        weights = {**exported_state, **parts["ema"]} if use_ema else exported_state  # EMA values for trained parameters
        if trainer.lora is not None:
            exported = _export_lora(trainer, step_dir, weights, dtype)
        else:
            single = _single_file(trainer)
            card = card_of_run(trainer, "pipeline", [single_file_name(step_dir)] if single else [])
            export_pipeline(trainer.unet, trainer.base_folder, step_dir, dtype, state=weights,
                            scheduler=trainer.export_scheduler, single_file=single, card=card)
            exported = f", export {step_dir}"
        exported += " (EMA weights)" if use_ema else ""
    logger.info("iteration %d: checkpoint %s%s", trainer.iteration, checkpoint, exported)
    return checkpoint


def no_room_for(trainer, model_state: dict, optimizer_state: dict, export: bool) -> str | None:
    """Why a checkpoint (and export) of about this size cannot be written now, or None."""
    elements = sum(v.numel() for v in model_state.values())
    ema = elements * 4 if trainer.ema is not None else 0  # the EMA is kept in fp32 whatever the weights' dtype
    needed = tensor_bytes(model_state) + tensor_bytes(optimizer_state) + ema
    if export:  # the trained weights in the export dtype; the frozen parts are hard links
        options = trainer.options.export
        needed += elements * DTYPES[options.dtype].itemsize
        if options.single_file:  # the whole pipeline once more, as one file
            unet = sum(p.numel() for p in trainer.unet.parameters())
            needed += unet * DTYPES[options.single_file_dtype].itemsize + _frozen_weight_bytes(trainer.base_folder)
    needed = int(needed * 1.02) + 2**20  # metadata, JSON, the manifest
    free = free_bytes(trainer.work_dir)
    if needed <= free:
        return None
    what = "checkpoint and export" if export else "checkpoint"
    return (f"iteration {trainer.iteration}: no room for the {what}: about {needed / 2**30:.2f} GiB needed, "
            f"{free / 2**30:.2f} GiB free on the filesystem of {trainer.work_dir}")


def _single_file(trainer) -> dict | None:
    """What export_pipeline needs for `export.single_file` (None when off)."""
    options = trainer.options
    if not options.export.single_file:
        return None
    run = {"config": options.train.config_name, "iteration": trainer.iteration, "base_model": str(options.model.pretrained)}
    return {"dtype": options.export.single_file_dtype, "run": run}


def _frozen_weight_bytes(base_folder) -> int:
    """The base pipeline's VAE and text-encoder files (what the single file holds of them, or more)."""
    folder = Path(base_folder)
    return sum(f.stat().st_size for name in ("vae", "text_encoder", "text_encoder_2") for f in (folder / name).glob("*.safetensors"))


def _export_lora(trainer, step_dir: Path, weights: dict, dtype: str) -> str:
    """`step<N>/pytorch_lora_weights.safetensors` (+ with `lora.kohya_export` its kohya-layout twin), and with
    `lora.fuse_export` a full pipeline `step<N>_fused/` (+ with `export.single_file` its one-file form)."""
    lora, unet = trainer.options.lora, trainer.unet
    with atomic_folder(step_dir) as tmp:
        if trainer.model.text_lora:  # names carry the component: unet.*, text_encoder.*, text_encoder_2.*
            parts = {key: {n[len(key) + 1:]: v for n, v in weights.items() if n.startswith(key + ".")}
                     for key in ("unet", "text_encoder", "text_encoder_2")}
            save_lora(unet, parts["unet"], tmp, list(trainer.conditioner.text_encoders),
                      [parts["text_encoder"], parts["text_encoder_2"]])
        else:
            save_lora(unet, weights, tmp)
        if lora.get("kohya_export"):
            write_kohya(tmp / LORA_FILE, tmp / KOHYA_FILE)
        write_card(tmp, **card_of_run(trainer, "lora", [KOHYA_FILE] if lora.get("kohya_export") else []))
    text = f", LoRA {step_dir / LORA_FILE}"
    if lora.get("fuse_export"):
        fused = step_dir.with_name(f"{step_dir.name}_fused")
        single = _single_file(trainer)
        base = None
        if trainer.runtime.unet_dtype != torch.float32:  # the frozen UNet is held in bf16: fold into it as stored
            from diffusers import UNet2DConditionModel

            base = UNet2DConditionModel.from_pretrained(trainer.base_folder, subfolder="unet").state_dict()
        export_pipeline(unet, trainer.base_folder, fused, dtype, state=fused_unet_state(unet, weights, base),
                        single_file=single, card=card_of_run(trainer, "pipeline", [single_file_name(fused)] if single else []))
        text += f", fused pipeline {fused}"
    return text


def sample_grid(trainer, step_dir: Path) -> Path | None:
    """Generate the configured prompts from the exported pipeline and save a labelled grid (rank 0)."""
    options = trainer.options.sample_grid
    if not options.specs or not trainer.accelerator.is_main_process:
        return None
    if trainer.lora is not None:  # the base pipeline with the exported LoRA, as a user would load it
        pipe = load_pipeline(trainer.base_folder, options.scheduler, device=str(trainer.device), lora=step_dir)
    else:
        sampler = "native" if trainer.export_scheduler is not None else options.scheduler
        pipe = load_pipeline(step_dir, sampler, device=str(trainer.device))
    out = trainer.work_dir / f"samples_{step_dir.name}.png"
    labelled_grid(generate_specs(pipe, list(options.specs)), [spec.label for spec in options.specs]).save(out)
    logger.info("sample grid from %s: %s", step_dir, out)
    return out
