"""Which checkpoint to resume from, and whether the config still describes the same run.

Resuming with another model, data, batch size, seed or number of processes would silently train
something else (or read the data in another order), so such a change is refused unless the user
says `--allow-config-change`. Keys that do not change what is computed (iteration count, logging,
checkpoint interval, gradient checkpointing) may change freely.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..errors import UserError
from . import distributed
from .checkpoint import complete_checkpoints, read_checkpoint, read_trainer_state
from .integrity import MANIFEST, UNVERIFIED, check_folder
from .optim import prepare_for_loading

logger = logging.getLogger("pgv25")

# Model keys that only trade memory or time; the trained function is the same (and a checkpoint of an older
# version, which recorded some of them, resumes under new defaults).
_FREE_MODEL_KEYS = {"gradient_checkpointing", "channels_last", "compile", "attention_backend", "frozen_dtype"}
# Keys that only choose which files an export writes: changing them on resume changes no weight.
_EXPORT_ONLY = {"model.lora.fuse_export", "model.lora.kohya_export"}
# Keys added after checkpoints already existed, with the value those checkpoints were trained with.
_NEWER_KEYS = {"model.lora.use_dora": False}


def fingerprint(cfg, world_size: int) -> dict:
    """The config keys a resumed run must share with its checkpoint, as plain JSON values."""
    model = {k: v for k, v in cfg.model.items() if k not in _FREE_MODEL_KEYS}
    loader = cfg.train_dataloader
    values = {
        "model": model,
        "train_dataloader.dataset": loader.dataset,
        "train_dataloader.batch_size": loader.batch_size,
        "optim_wrapper.accumulative_counts": cfg.optim_wrapper.get("accumulative_counts", 1),
        "optim_wrapper.optimizer.type": cfg.optim_wrapper.optimizer.get("type", "AdamW"),
        "randomness.seed": cfg.randomness.seed,
        "processes": world_size,
    }
    if loader.get("datasets"):  # several datasets: absent otherwise, as in older checkpoints
        values["train_dataloader.datasets"] = list(loader.datasets)
    objective = dict(cfg.get("objective") or {})
    if objective.get("type", "denoising") != "denoising":  # absent for plain fine-tuning, as in older checkpoints
        values["objective"] = objective
    return json.loads(json.dumps(values, sort_keys=True, default=str))


def _flatten(value, prefix: str) -> dict:
    if isinstance(value, dict):
        out = {}
        for key, sub in value.items():
            out.update(_flatten(sub, f"{prefix}.{key}"))
        return out
    return {prefix: value}


def config_changes(saved: dict, current: dict) -> list[str]:
    """'key: saved -> now' for every fingerprint value that differs."""
    saved = {**saved, "model": {k: v for k, v in (saved.get("model") or {}).items() if k not in _FREE_MODEL_KEYS}}
    old, new = {}, {}
    for key in sorted(set(saved) | set(current)):
        old.update(_flatten(saved.get(key), key))
        new.update(_flatten(current.get(key), key))
    for key, value in _NEWER_KEYS.items():
        if key in new and key not in old:
            old[key] = value
    return [f"{key}: {old.get(key)!r} -> {new.get(key)!r}" for key in sorted(set(old) | set(new))
            if old.get(key) != new.get(key) and key not in _EXPORT_ONLY]


def checkpoint_to_resume(resume, work_dir: Path) -> Path | None:
    """`--resume` alone: the newest verified checkpoint of the work dir (None: start fresh), passing over damaged
    ones, and ones whose manifest was lost, with a line each; a path: that one, refused in one line if it is damaged.

    A checkpoint is written with its manifest inside the folder that is renamed into place, so a pgv25 that writes
    manifests never leaves one without: when an older checkpoint of the same work dir has one, a newer one without it
    lost it later (a partial copy, a cleanup) and nothing vouches for its files. It is passed over like a damaged one;
    named explicitly (`--resume PATH`) it is used, with the same line. When no checkpoint has a manifest (written
    before manifests existed), the newest is used, with a line saying its files cannot be checked.
    """
    if not resume:
        return None
    if resume is True:
        found = complete_checkpoints(work_dir / "checkpoints")
        if not found:
            logger.info("--resume: no checkpoint in %s yet; starting from the beginning", work_dir / "checkpoints")
            return None
        recorded = [(c / MANIFEST).is_file() for c in found]
        lost, damaged = [], []  # passed over, newest first
        for i in reversed(range(len(found))):
            candidate = found[i]
            check = check_folder(candidate)
            if check.state == UNVERIFIED:
                if any(recorded[:i]):  # an older one has a manifest: this one's was lost
                    lost.append(candidate)
                    continue
                logger.warning("checkpoint %s was written without a manifest (an older pgv25): its files cannot be "
                               "checked; resuming from it", candidate)
                return candidate
            if not check.damaged:
                for name in lost:
                    logger.warning("checkpoint %s has lost its %s (older checkpoints have theirs): its files cannot be "
                                   "checked, so it is passed over for the newest verified one, %s (--resume %s uses it anyway)",
                                   name, MANIFEST, candidate.name, name)
                return candidate
            damaged.append(f"{candidate.name}: {check.state}")
            logger.warning("checkpoint %s is damaged (%s); trying the one before it", candidate, check.state)
        if not lost:
            raise UserError(f"--resume: every checkpoint in {work_dir / 'checkpoints'} is damaged ({'; '.join(damaged)}); "
                            "move them away to start from the beginning")
        raise UserError(f"--resume: no verified checkpoint in {work_dir / 'checkpoints'} "
                        f"({'; '.join([f'{c.name}: {MANIFEST} lost' for c in lost] + damaged)}); "
                        f"give one with --resume PATH to use it anyway, or move them away to start from the beginning")
    path = Path(resume)
    if not path.is_dir():
        raise UserError(f"--resume: checkpoint {path} does not exist")
    check = check_folder(path)
    if check.damaged:
        raise UserError(f"--resume: checkpoint {path} is damaged: {check.state}")
    if check.state == UNVERIFIED:
        logger.warning("checkpoint %s has no %s: its files cannot be checked; resuming from it as asked", path, MANIFEST)
    return path


def check_same_run(checkpoint: Path, current: dict, allow_change: bool) -> dict:
    """The checkpoint's trainer state, after refusing (or, when allowed, logging) a changed config."""
    state = read_trainer_state(checkpoint)
    changes = config_changes(state.get("fingerprint", {}), current)
    if changes and not allow_change:
        shown = "; ".join(changes[:3]) + (f"; and {len(changes) - 3} more" if len(changes) > 3 else "")
        raise UserError(f"the config differs from the one checkpoint {checkpoint} was trained with ({shown}); "
                        "pass --allow-config-change to resume anyway")
    for change in changes:
        logger.warning("resuming with a changed config (--allow-config-change): %s", change)
    return state


def chosen_checkpoint(accelerator, resume, work_dir: Path) -> Path | None:
    """Rank 0 picks (and verifies: hashing is I/O best done once) the checkpoint; every rank gets its choice or its error."""
    choice = None
    if accelerator.is_main_process:
        try:
            choice = checkpoint_to_resume(resume, work_dir)
        except UserError as error:
            choice = error
    choice = distributed.broadcast_object(choice)
    if isinstance(choice, UserError):
        raise UserError(str(choice))
    return choice


def restore(trainer, checkpoint: Path, allow_config_change: bool) -> tuple[tuple[int, int], dict | None, dict | None]:
    """Load a checkpoint into the trainer's built parts; returns this rank's data position (batches consumed,
    images skipped), RNG state (None: fresh streams) and streaming position."""
    state = check_same_run(checkpoint, trainer.fingerprint, allow_config_change)
    rank, world_size = trainer.rank, trainer.world_size
    try:
        model_state, parts = read_checkpoint(checkpoint, weights=rank == 0 or world_size == 1, lazy=world_size == 1)
        error = None
    except UserError as failure:
        error = str(failure)
    failed = [e for e in distributed.gather_objects(error) if e]
    if failed:  # every rank raises, none waits in a broadcast
        raise UserError(failed[0])
    optim, scaler = trainer.optim, trainer.accelerator.scaler
    prepare_for_loading(optim.optimizer.optimizer)
    try:
        distributed.load_full_state(trainer.trained, optim.optimizer.optimizer, model_state, parts["optimizer"],
                                    trainable_only=trainer.lora is not None)
        optim.lr_scheduler.load_state_dict(parts["lr_scheduler"])
        if scaler is not None and "grad_scaler" in parts:
            scaler.load_state_dict(parts["grad_scaler"])
    except (KeyError, ValueError, RuntimeError) as error:
        raise UserError(f"cannot resume from {checkpoint}: {str(error).strip().splitlines()[0]}") from None
    if trainer.ema is not None:
        if "ema" in parts:
            try:
                trainer.ema.load_state(parts["ema"], int(state.get("ema_updates", 0)))
            except ValueError as error:
                raise UserError(f"cannot resume from {checkpoint}: {error}") from None
        else:
            logger.warning("%s holds no EMA weights: the EMA starts from the resumed weights", checkpoint)
    trainer.iteration = int(state["iteration"])
    trainer.nonfinite_total = int(state.get("nonfinite_skipped", 0))
    ranks = state["ranks"]
    if len(ranks) == world_size:
        mine = ranks[rank]
        position, rng, stream = (mine["consumed"], mine["skipped"]), parts["rng"]["ranks"][rank], mine.get("stream")
    else:  # allowed change of process count: same number of samples seen in total, fresh RNG streams
        position, rng, stream = (sum(r["consumed"] for r in ranks) // world_size, 0), None, None
        logger.warning("resuming %d-process checkpoint with %d processes: data order and RNG streams differ from an uninterrupted run",
                       len(ranks), world_size)
    logger.info("resumed from %s at iteration %d", checkpoint, trainer.iteration)
    return position, rng, stream
