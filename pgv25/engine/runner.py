"""The training loop: build everything from the config, train the UNet with EDM, checkpoint, export.

accelerate owns devices, mixed precision and the process group; `distributed.py` owns how the UNet
is spread over processes; this file owns the order of things. One iteration = one optimizer update
of `accumulative_counts` micro-batches on every process.

Every decision that could differ between processes (skip a non-finite update, stop on a signal,
save) is either a function of the iteration number or OR-ed over all ranks first, so the
processes never disagree about what happens next.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data.dataset import collate
from ..data.index import describe_problems, problem_lines
from ..data.sampler import BucketBatchSampler
from ..errors import UserError
from ..generate import generate_specs, labelled_grid, load_pipeline, prompt_specs
from ..models.lora import fused_unet_state, lora_init, save_lora
from ..models.lora_files import LORA_FILE
from ..models.lora_files import KOHYA_FILE, write_kohya
from ..models.speed import ATTENTION_BACKENDS, attention_backend
from ..objectives import batch_inputs, build_objective, objective_options
from . import distributed
from .build import build_data, build_model, build_optimisation, build_runtime
from .checkpoint import read_checkpoint, rng_state, save_checkpoint, set_rng_state
from .ema import build_ema
from .export import atomic_folder, export_options, export_pipeline, single_file_name
from .locks import WorkDirLock
from .model_card import card_of_run, write_card
from .resume import check_same_run, checkpoint_to_resume, fingerprint
from .signals import GracefulStop
from .validation import ValidationSampler

logger = logging.getLogger("pgv25")
SCALARS = "scalars.jsonl"  # one JSON line per logged iteration, full precision (for plots and checks)
SKIPPED_FILES = "skipped_files.txt"  # reason<TAB>path of every image or row left out
TRAIN_LOG_ONLY = "pgv25.train_log"  # a logger whose lines reach train.log but not the terminal
train_log_only = logging.getLogger(TRAIN_LOG_ONLY)
train_log_only.propagate = False
train_log_only.setLevel(logging.INFO)
EPOCH_SUMMARY_EVERY_S = 600  # an epoch summary with nothing new reaches the terminal at most this often


def work_dir_of(cfg) -> Path:
    return Path(cfg.get("work_dir") or Path("work_dirs") / cfg.config_name)


def trackers_of(cfg) -> list[str]:
    """`log_with`: TensorBoard always; 'wandb' when asked for and installed (one line if not)."""
    wanted = list(dict.fromkeys(["tensorboard", *(cfg.get("log_with") or [])]))
    unknown = [t for t in wanted if t not in ("tensorboard", "wandb")]
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


def flat_config(cfg) -> dict:
    """The config as flat scalar key/values, the form trackers record as run parameters."""
    flat = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else key, item)
        elif isinstance(value, (int, float, str, bool)):
            flat[prefix] = value
        else:
            flat[prefix] = str(value)

    walk("", cfg.to_dict())
    return flat


def ensure_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write_test{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise UserError(f"work dir {folder} is not writable: {error.strerror or error}") from None


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


def out_of_memory_message(iteration: int, batch_size: int, shape, peak_gib: float | None, checkpoint) -> str:
    """The one line a CUDA out-of-memory ends a run with: where, how big, and what to switch on."""
    where = f"a batch of {shape[0]} images at {shape[1]}×{shape[2]}" if shape else f"batch_size {batch_size}"
    peak = f"; peak {peak_gib:.1f} GiB allocated" if peak_gib is not None else ""
    kept = f"the last checkpoint, {checkpoint}, is untouched" if checkpoint else "no checkpoint was written yet"
    return (f"iteration {iteration}: out of GPU memory on {where} (train_dataloader.batch_size={batch_size} per process){peak}. "
            "Try model.gradient_checkpointing=True, a smaller train_dataloader.batch_size with "
            "optim_wrapper.accumulative_counts to keep the batch, optim_wrapper.optimizer.type=AdamW8bit or Adafactor, "
            f"or model.lora.enabled=True; {kept}")


@dataclass
class Batches:
    """Endless batches from the loader; unreadable images are counted, by reason, and their paths logged.

    A batch whose every image was unreadable is skipped whole and the next one taken.
    """

    loader: torch.utils.data.DataLoader
    consumed: int = 0  # batches taken from the sampler stream (this rank's data position)
    skipped: int = 0  # unreadable samples so far
    log_path: Path | None = None  # every rank appends `reason<TAB>path` lines here
    recent: Counter = field(default_factory=Counter)  # reasons since the last epoch summary
    stream: dict = field(default_factory=dict)  # streaming: loader worker → (epoch, rows read) of its latest batch

    def __post_init__(self):
        self._iterator = iter(self.loader)

    def __next__(self) -> dict:
        while True:
            batch = next(self._iterator)
            self.consumed += 1
            if "stream_position" in batch:
                worker, epoch, read = batch.pop("stream_position")
                self.stream[str(worker)] = (epoch, read)
            if batch["problems"]:
                self._record(batch["problems"])
            if batch["size"]:
                return batch

    def _record(self, problems: list[tuple[str, str]]) -> None:
        self.skipped += len(problems)
        self.recent.update(reason for _, reason in problems)
        for label, reason in problems:
            logger.warning("skipped %s: %s", label, reason)
        if self.log_path is not None:  # short lines in append mode: concurrent ranks do not interleave
            with open(self.log_path, "a") as f:
                f.write(problem_lines(problems))


@dataclass
class StepResult:
    loss: torch.Tensor  # this rank's mean loss over the micro-batches
    grad_norm: torch.Tensor
    images: int  # this rank's images
    nonfinite: bool  # the update was skipped (loss or gradient not finite on some rank)
    stop: bool  # some rank received SIGINT/SIGTERM


@dataclass
class TrainResult:
    iteration: int
    step_dir: Path | None = None  # the last export
    checkpoint: Path | None = None  # the last checkpoint written
    stopped_by: str | None = None  # the signal that stopped the run early
    grid: Path | None = None


class Trainer:
    """Holds the built parts (engine/build.py); `run()` trains to `train_cfg.max_iters` or until a stop signal."""

    def __init__(self, cfg, resume: str | bool | None = None, allow_config_change: bool = False):
        self.cfg = cfg
        self.work_dir = work_dir_of(cfg)
        ensure_writable(self.work_dir)
        objective_options(cfg)  # a wrong objective or export option fails before any data or model loads
        export_options(cfg)
        lora_init(dict(cfg.model.get("lora") or {}))  # an unusable init_from file
        sample_specs(cfg)  # a malformed prompt list, too
        prompt_specs((cfg.get("validation") or {}).get("prompts"), {}, "validation.prompts")
        # Rank 0 of a run holds the work dir for as long as it trains: a second run there refuses in one line.
        self._lock = WorkDirLock(self.work_dir) if int(os.environ.get("RANK", "0")) == 0 else None
        try:
            self._build(cfg, resume, allow_config_change)
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """Let another run use the work dir (also when this process ends, however it ends)."""
        if self._lock is not None:
            self._lock.release()

    def _build(self, cfg, resume, allow_config_change) -> None:
        self.seed = int(cfg.randomness.seed)
        self.runtime = runtime = build_runtime(cfg, self.work_dir, trackers_of(cfg))
        self.accelerator, self.device = runtime.accelerator, runtime.device
        self.rank, self.world_size, self.sharded = runtime.rank, runtime.world_size, runtime.sharded
        self._open_log()
        checkpoint = self._checkpoint_to_resume(resume)  # a damaged one is found before gigabytes load
        self.data = build_data(cfg, runtime)
        self.attention_backend = cfg.model.get("attention_backend")  # the SDPA kernel tried first (None: PyTorch's order)
        if self.attention_backend not in (None, *ATTENTION_BACKENDS):
            raise UserError(f"model.attention_backend must be one of {', '.join(ATTENTION_BACKENDS)} or None, "
                            f"got {self.attention_backend!r}")
        self.model = build_model(cfg, runtime, self.data.cached, len(self.data.plan.sizes) if self.data.plan else 32)
        self.objective = build_objective(cfg, self.model, self.device)
        self.export_scheduler = self.objective.schedule.export_scheduler
        self.max_iters = int(cfg.train_cfg.max_iters)
        self.max_nonfinite = int(cfg.train_cfg.get("max_nonfinite_iters", 5))
        self.optim = build_optimisation(cfg, runtime, self.model, self.objective, self.max_iters)
        self.generator = torch.Generator(self.device).manual_seed(self.seed + self.rank)
        self._build_hooks(cfg.get("ema") or {}, cfg.get("validation") or {})
        self.iteration = 0
        self.skipped_saves = 0  # saves in a row skipped for want of disk space
        self.nonfinite_total = 0  # skipped updates so far
        self.nonfinite_run = 0  # consecutive skipped updates
        self._loader_wait = 0.0  # seconds spent in next(batches) since the last log line
        self.fingerprint = fingerprint(cfg, self.world_size)
        position, rng = (0, 0), None
        self.stream_resume = None  # per loader worker (epoch, rows read) of a streaming dataset
        if checkpoint is not None:
            position, rng = self._restore(checkpoint, allow_config_change)
        self.batches = Batches(self._loader(position[0]), consumed=position[0], skipped=position[1],
                               log_path=self.work_dir / SKIPPED_FILES)
        if rng is not None:  # last: building the loader iterator draws from the global torch RNG
            set_rng_state(rng, self.generator)

    # The parts tests and tools reach for by name.
    unet = property(lambda self: self.model.unet)
    trained = property(lambda self: self.model.trained)
    conditioner = property(lambda self: self.model.conditioner)
    codec = property(lambda self: self.model.codec)
    base_folder = property(lambda self: self.model.base_folder)
    lora = property(lambda self: self.model.lora)

    def _open_log(self) -> None:
        """train.log in the work dir, written by rank 0; the other ranks log warnings only."""
        self._log_file = None
        if self.accelerator.is_main_process:
            self._log_file = logging.FileHandler(self.work_dir / "train.log")
            self._log_file.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
            logger.addHandler(self._log_file)
            train_log_only.addHandler(self._log_file)  # routine lines (an epoch with nothing to report) go only there
        else:
            logger.setLevel(logging.WARNING)  # one progress log per run, from rank 0

    def _build_hooks(self, ema_cfg: dict, validation_cfg: dict) -> None:
        """EMA of what trains and the validation sampler."""
        self.export_ema = ema_cfg.get("export", "ema")
        if self.export_ema not in ("ema", "model"):
            raise UserError(f"ema.export must be 'ema' or 'model', got '{self.export_ema}'")
        if ema_cfg.get("enabled") and self.sharded:
            raise UserError("ema with strategy='fsdp' is not supported yet; use strategy='ddp' or disable ema")
        # DDP keeps identical weights on every rank, so rank 0's EMA is the EMA; the others keep none.
        self.ema = build_ema(self.trained, ema_cfg) if self.accelerator.is_main_process else None
        model = self.model
        self.validation = ValidationSampler(validation_cfg, model.base_folder, model.unet, self.ema, self.device,
                                            model.cond_dtype, self.accelerator.autocast, self.work_dir,
                                            int(self.cfg.train_dataloader.dataset.resolution),
                                            list(model.conditioner.text_encoders) if model.text_lora else None,
                                            self.export_scheduler)
        if self.validation.enabled and self.sharded:  # a sharded UNet cannot sample on rank 0 alone
            logger.warning("validation samples are not made with strategy='fsdp' yet; the final sample grid still comes from the export")
            self.validation.interval = 0

    def _checkpoint_to_resume(self, resume) -> Path | None:
        """Rank 0 picks (and verifies: hashing is I/O best done once) the checkpoint; every rank gets its choice or its error."""
        choice = None
        if self.accelerator.is_main_process:
            try:
                choice = checkpoint_to_resume(resume, self.work_dir)
            except UserError as error:
                choice = error
        choice = distributed.broadcast_object(choice)
        if isinstance(choice, UserError):
            raise UserError(str(choice))
        return choice

    def _restore(self, checkpoint: Path, allow_config_change: bool) -> tuple[tuple[int, int], dict | None]:
        """Load a checkpoint into the built objects; returns this rank's (data position, RNG state)."""
        state = check_same_run(checkpoint, self.fingerprint, allow_config_change)
        try:
            model_state, parts = read_checkpoint(checkpoint, weights=self.rank == 0 or self.world_size == 1)
            error = None
        except UserError as failure:
            error = str(failure)
        failed = [e for e in distributed.gather_objects(error) if e]
        if failed:  # every rank raises, none waits in a broadcast
            raise UserError(failed[0])
        try:
            distributed.load_full_state(self.trained, self.optim.optimizer.optimizer, model_state, parts["optimizer"],
                                        trainable_only=self.lora is not None)
            self.optim.lr_scheduler.load_state_dict(parts["lr_scheduler"])
            if self.accelerator.scaler is not None and "grad_scaler" in parts:
                self.accelerator.scaler.load_state_dict(parts["grad_scaler"])
        except (KeyError, ValueError, RuntimeError) as error:
            raise UserError(f"cannot resume from {checkpoint}: {str(error).strip().splitlines()[0]}") from None
        if self.ema is not None:
            if "ema" in parts:
                try:
                    self.ema.load_state(parts["ema"], int(state.get("ema_updates", 0)))
                except ValueError as error:
                    raise UserError(f"cannot resume from {checkpoint}: {error}") from None
            else:
                logger.warning("%s holds no EMA weights: the EMA starts from the resumed weights", checkpoint)
        self.iteration = int(state["iteration"])
        self.nonfinite_total = int(state.get("nonfinite_skipped", 0))
        ranks = state["ranks"]
        if len(ranks) == self.world_size:
            mine = ranks[self.rank]
            position, rng = (mine["consumed"], mine["skipped"]), parts["rng"]["ranks"][self.rank]
            self.stream_resume = mine.get("stream")
        else:  # allowed change of process count: same number of samples seen in total, fresh RNG streams
            per_rank = sum(r["consumed"] for r in ranks) // self.world_size
            position, rng = (per_rank, 0), None
            logger.warning("resuming %d-process checkpoint with %d processes: data order and RNG streams differ from an uninterrupted run",
                           len(ranks), self.world_size)
        if self.accelerator.is_main_process:
            self._truncate_scalars()
        logger.info("resumed from %s at iteration %d", checkpoint, self.iteration)
        return position, rng

    def _truncate_scalars(self) -> None:
        """Drop lines logged after the checkpoint by the interrupted run; they will be logged again."""
        path = self.work_dir / SCALARS
        if path.is_file():
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["iteration"] <= self.iteration]
            path.write_text("".join(line + "\n" for line in kept))

    def _loader(self, start_batches: int):
        workers = int(self.cfg.train_dataloader.get("num_workers", 0))
        data, pin = self.data, self.device.type == "cuda"
        if data.streaming:
            data.dataset.resume = self.stream_resume or {}
            return torch.utils.data.DataLoader(data.dataset, batch_size=None, num_workers=workers,
                                               pin_memory=pin, persistent_workers=workers > 0)
        try:
            self.sampler = sampler = BucketBatchSampler(
                data.plan.bucket_of, data.batch_size, data.plan.weighting, self.seed, self.rank, self.world_size, start_batches,
                companion=data.plan.companion,
            )
        except ValueError as error:
            raise UserError(f"train_dataloader: {error}") from None
        return torch.utils.data.DataLoader(data.dataset, batch_sampler=sampler, num_workers=workers, collate_fn=collate,
                                           pin_memory=pin, persistent_workers=workers > 0)

    def micro_step(self, batch: dict) -> torch.Tensor:
        """One forward/backward of the objective on a batch; returns the (detached) mean loss."""
        x0, cond = self.model.inputs(batch, self.device, self.generator)
        extra = batch_inputs(self.objective, batch, self.device)  # what else of the batch the objective reads
        target = batch["time_ids"][0, 4:6].tolist()  # the bucket (h, w) in pixels
        self._batch_shape = (len(x0), int(target[1]), int(target[0]))  # named if this step runs out of memory
        with self.accelerator.autocast(), attention_backend(self.attention_backend):
            loss = self.optim.step_module(x0, cond, self.generator, **extra).mean()
        self.accelerator.backward(loss / self.optim.accumulation)
        return loss.detach()

    @contextlib.contextmanager
    def _gradient_sync(self, sync: bool):
        """Skip the gradient all-reduce on all but the last micro-batch of an accumulation."""
        if sync:
            yield
        elif self.sharded:
            self.unet.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                self.unet.set_requires_gradient_sync(True)
        else:
            with self.accelerator.no_sync(self.optim.step_module):
                yield

    def _grad_norm(self) -> torch.Tensor:
        """Total gradient norm, clipped to `clip_grad.max_norm` when set (unscaled first under fp16)."""
        optim = self.optim
        if optim.text_params and self.world_size > 1:  # outside the DDP module: average their gradients here
            distributed.average_gradients([p for p in optim.text_params if p.grad is not None])
        norm = self.accelerator.clip_grad_norm_(optim.trained_params, optim.clip_norm)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # a DTensor under FSDP

    def step(self, stop_requested: bool = False) -> StepResult:
        """One optimizer update, skipped on every rank when any rank saw a non-finite loss or gradient."""
        losses, images, optim = [], 0, self.optim
        for micro in range(optim.accumulation):
            asked = time.perf_counter()
            batch = next(self.batches)
            self._loader_wait += time.perf_counter() - asked
            with self._gradient_sync(micro == optim.accumulation - 1):
                losses.append(self.micro_step(batch))
            images += len(batch["time_ids"])  # images, not samples: a preference pair is two
        loss = torch.stack(losses).mean()
        grad_norm = self._grad_norm()
        flags = torch.stack([~torch.isfinite(loss), ~torch.isfinite(grad_norm).to(loss.device),
                             torch.tensor(stop_requested, device=loss.device)])
        bad_loss, bad_grad, stop = distributed.any_rank(flags)  # the step's one host sync
        scaler = self.accelerator.scaler
        if not (bad_loss or bad_grad) or (scaler is not None and not bad_loss):
            optim.optimizer.step()  # an fp16 overflow (finite loss, inf gradient) is the grad scaler's to skip
        optim.lr_scheduler.step()
        optim.optimizer.zero_grad(set_to_none=True)
        nonfinite = bad_loss or (bad_grad and scaler is None)
        self.objective.commit(keep=not nonfinite)
        return StepResult(loss, grad_norm, images, nonfinite=nonfinite, stop=stop)

    def _check_finite(self, result: StepResult) -> None:
        if not result.nonfinite:
            self.nonfinite_run = 0
            return
        self.nonfinite_total += 1
        self.nonfinite_run += 1
        logger.warning("iteration %d: non-finite loss (%s) or gradient norm (%s); update skipped (%d in a row, %d in all)",
                       self.iteration, float(result.loss), float(result.grad_norm), self.nonfinite_run, self.nonfinite_total)
        if self.nonfinite_run >= self.max_nonfinite:
            raise UserError(
                f"iteration {self.iteration}: {self.max_nonfinite} consecutive iterations with a non-finite loss or gradient "
                f"(train_cfg.max_nonfinite_iters); stopped without saving them. Resume from the last checkpoint "
                "with a lower optim_wrapper.optimizer.lr or with optim_wrapper.clip_grad set"
            )

    def save(self, export: bool = True) -> tuple[Path | None, Path | None]:
        """A resumable checkpoint and (optionally) a diffusers export; all ranks gather, rank 0 writes.

        A failed write raises the same one-line error on every rank, so none waits for the others. When the
        work dir's filesystem has no room for them, the save is skipped with a line saying so ((None, None));
        a second skip in a row stops the run. Nothing is deleted to make room.
        """
        model_state = distributed.full_model_state(self.trained, trainable_only=self.lora is not None)
        optimizer_state = distributed.full_optimizer_state(self.trained, self.optim.optimizer.optimizer)
        no_room = None
        if self.accelerator.is_main_process:
            no_room = self._no_room(model_state, optimizer_state, export)
        no_room = distributed.broadcast_object(no_room)
        if no_room:
            self.skipped_saves += 1
            if self.skipped_saves >= 2:
                raise UserError(f"{no_room}; stopped after two saves in a row could not be written "
                                f"(the last checkpoint written is intact); free space and resume with --resume")
            logger.warning("%s; this save is skipped and training goes on to the next one", no_room)
            return None, None
        self.skipped_saves = 0
        ranks = distributed.gather_objects(
            {"consumed": self.batches.consumed, "skipped": self.batches.skipped, "rng": rng_state(self.generator),
             "stream": self.batches.stream or None}
        )
        checkpoint = self.work_dir / "checkpoints" / f"iter_{self.iteration:07d}"
        step_dir = self.work_dir / f"step{self.iteration}" if export else None
        error = None
        if self.accelerator.is_main_process:
            try:
                bad = [name for name, value in model_state.items() if not torch.isfinite(value).all()]
                if bad:  # cannot happen past the non-finite guard; never write such weights if it does
                    raise UserError(f"iteration {self.iteration}: refusing to save non-finite weights ({bad[0]}, ...)")
                scaler = self.accelerator.scaler
                parts = {
                    "optimizer": optimizer_state, "lr_scheduler": self.optim.lr_scheduler.state_dict(),
                    "grad_scaler": scaler.state_dict() if scaler is not None else None,
                    "rng": {"ranks": [r.pop("rng") for r in ranks]},
                    "ema": self.ema.state() if self.ema is not None else None,
                }
                trainer_state = {
                    "ranks": ranks, "world_size": self.world_size, "nonfinite_skipped": self.nonfinite_total,
                    "config": self.cfg.config_name, "fingerprint": self.fingerprint,
                    "ema_updates": self.ema.updates if self.ema is not None else None,
                }
                keep = self.cfg.default_hooks.checkpoint.get("max_keep_ckpts")
                checkpoint = save_checkpoint(checkpoint.parent, self.iteration, model_state, parts, trainer_state, keep)
                exported = ""
                if step_dir is not None:
                    dtype = self.cfg.get("export", {}).get("dtype", "fp32")
                    use_ema = self.ema is not None and self.export_ema == "ema"
                    weights = {**model_state, **parts["ema"]} if use_ema else model_state  # EMA values for trained parameters
                    if self.lora is not None:
                        exported = self._export_lora(step_dir, weights, dtype)
                    else:
                        single = self._single_file()
                        card = card_of_run(self, "pipeline", [single_file_name(step_dir)] if single else [])
                        export_pipeline(self.unet, self.base_folder, step_dir, dtype, state=weights, scheduler=self.export_scheduler,
                                        single_file=single, card=card)
                        exported = f", export {step_dir}"
                    exported += " (EMA weights)" if use_ema else ""
                logger.info("iteration %d: checkpoint %s%s", self.iteration, checkpoint, exported)
            except UserError as failure:
                error = str(failure)
        error = distributed.broadcast_object(error)
        if error:
            raise UserError(error)
        return checkpoint, step_dir

    def _no_room(self, model_state: dict, optimizer_state: dict, export: bool) -> str | None:
        """Why a checkpoint (and export) of about this size cannot be written now, or None."""
        ema = model_state if self.ema is not None else {}
        needed = tensor_bytes(model_state) + tensor_bytes(optimizer_state) + tensor_bytes(ema)
        if export:  # the trained weights in the export dtype; the frozen parts are hard links
            options = self.cfg.get("export") or {}
            scale = {"fp32": 1.0, "fp16": 0.5, "bf16": 0.5}
            needed += int(tensor_bytes(model_state) * scale.get(options.get("dtype", "fp32"), 1.0))
            if options.get("single_file"):  # the whole pipeline once more, as one file
                unet = sum(p.numel() for p in self.unet.parameters()) * 4
                needed += int(unet * scale.get(options.get("single_file_dtype", "fp16"), 1.0)) + self._frozen_weight_bytes()
        needed = int(needed * 1.02) + 2**20  # metadata, JSON, the manifest
        free = free_bytes(self.work_dir)
        if needed <= free:
            return None
        what = "checkpoint and export" if export else "checkpoint"
        return (f"iteration {self.iteration}: no room for the {what}: about {needed / 2**30:.2f} GiB needed, "
                f"{free / 2**30:.2f} GiB free on the filesystem of {self.work_dir}")

    def _single_file(self) -> dict | None:
        """What export_pipeline needs for `export.single_file` (None when off)."""
        options = self.cfg.get("export") or {}
        if not options.get("single_file"):
            return None
        run = {"config": self.cfg.config_name, "iteration": self.iteration,
               "base_model": str(self.cfg.model.pretrained_model_name_or_path)}
        return {"dtype": options.get("single_file_dtype", "fp16"), "run": run}

    def _frozen_weight_bytes(self) -> int:
        """The base pipeline's VAE and text-encoder files (what the single file holds of them, or more)."""
        folder = Path(self.base_folder)
        return sum(f.stat().st_size for name in ("vae", "text_encoder", "text_encoder_2") for f in (folder / name).glob("*.safetensors"))

    def _export_lora(self, step_dir: Path, weights: dict, dtype: str) -> str:
        """`step<N>/pytorch_lora_weights.safetensors` (+ with `lora.kohya_export` its kohya-layout twin), and with
        `lora.fuse_export` a full pipeline `step<N>_fused/` (+ with `export.single_file` its one-file form)."""
        with atomic_folder(step_dir) as tmp:
            if self.model.text_lora:  # names carry the component: unet.*, text_encoder.*, text_encoder_2.*
                parts = {key: {n[len(key) + 1:]: v for n, v in weights.items() if n.startswith(key + ".")}
                         for key in ("unet", "text_encoder", "text_encoder_2")}
                save_lora(self.unet, parts["unet"], tmp, list(self.conditioner.text_encoders),
                          [parts["text_encoder"], parts["text_encoder_2"]])
            else:
                save_lora(self.unet, weights, tmp)
            if self.lora.get("kohya_export"):
                write_kohya(tmp / LORA_FILE, tmp / KOHYA_FILE)
            write_card(tmp, **card_of_run(self, "lora", [KOHYA_FILE] if self.lora.get("kohya_export") else []))
        text = f", LoRA {step_dir / LORA_FILE}"
        if self.lora.get("fuse_export"):
            fused = step_dir.with_name(f"{step_dir.name}_fused")
            single = self._single_file()
            export_pipeline(self.unet, self.base_folder, fused, dtype, state=fused_unet_state(self.unet, weights),
                            single_file=single, card=card_of_run(self, "pipeline", [single_file_name(fused)] if single else []))
            text += f", fused pipeline {fused}"
        return text

    def _log(self, window_losses: list, window_images: int, elapsed: float, seconds_per_iter: float, grad_norm) -> None:
        """A progress line, TensorBoard scalars and a scalars.jsonl line (a collective: the loss is the mean over ranks)."""
        window = torch.stack(window_losses).mean() if window_losses else torch.tensor(math.nan, device=self.device)
        mean_loss = float(distributed.mean_over_ranks(window.float()))
        rate = window_images * self.world_size / max(elapsed, 1e-9)
        eta = int(seconds_per_iter * (self.max_iters - self.iteration))
        lr = self.optim.lr_scheduler.get_last_lr()[0]
        extra = (f"  skipped images {self.batches.skipped}" if self.batches.skipped else "") + (
            f"  skipped updates {self.nonfinite_total}" if self.nonfinite_total else "")
        logger.info("iter %d/%d  loss %.4f  lr %.2e  %.1f img/s  eta %d:%02d:%02d%s", self.iteration, self.max_iters,
                    mean_loss, lr, rate, eta // 3600, eta // 60 % 60, eta % 60, extra)
        metrics = {"loss": mean_loss, "lr": lr, "images_per_s": rate, "grad_norm": float(grad_norm), **self.objective.metrics(),
                   # the share of the window this rank sat waiting for the loader (near 0: the loader keeps up)
                   "loader_wait": min(1.0, self._loader_wait / max(elapsed, 1e-9))}
        self._loader_wait = 0.0
        if self.device.type == "cuda":
            metrics["gpu_peak_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.accelerator.log(metrics, step=self.iteration)
        if self.accelerator.is_main_process:
            with open(self.work_dir / SCALARS, "a") as f:
                f.write(json.dumps({"iteration": self.iteration, **metrics}) + "\n")

    def _validate(self) -> None:
        """Validation samples on rank 0 (the others wait for it at the next step's all-reduce)."""
        if self.validation.enabled and self.accelerator.is_main_process:
            self.validation.run(self.iteration, self.accelerator.trackers, exported=self.export_ema)

    def _report_scan(self) -> None:
        """Log the buckets and the rows the scan left out; start the skipped-files list on a fresh run."""
        plan = self.data.plan
        if plan is None:
            logger.info("streaming %s: rows are bucketed as they arrive", self.cfg.train_dataloader.dataset.path)
            return
        histogram = ", ".join(f"{w}x{h}: {n}" for (w, h), n in plan.histogram())
        logger.info("%d %s in %d bucket(s) (%s)%s", len(plan.index), "pairs" if plan.rows.pairs else "images", len(plan.sizes), histogram,
                    describe_problems(plan.index.reasons(), "; the scan excluded"))
        if self.accelerator.is_main_process and self.iteration == 0:
            (self.work_dir / SKIPPED_FILES).write_text(problem_lines(plan.index.problems))
            if plan.index.problems:
                logger.info("excluded rows and their reasons: %s", self.work_dir / SKIPPED_FILES)

    def _epoch_summary(self, epoch: int) -> None:
        """One line per epoch (a collective): images skipped on all ranks since the last one, by reason.

        Always in train.log and TensorBoard; in the terminal only when images were skipped in this epoch, or
        when the last summary shown there is EPOCH_SUMMARY_EVERY_S old (a short epoch would print a line a minute).
        """
        recent = Counter()
        for counts in distributed.gather_objects(dict(self.batches.recent)):
            recent.update(counts)
        self.batches.recent.clear()
        excluded = self.data.plan.index.reasons()
        show = bool(recent) or time.time() - self._summary_shown_at >= EPOCH_SUMMARY_EVERY_S
        if show:
            self._summary_shown_at = time.time()
        (logger if show else train_log_only).info(
            "epoch %d done at iteration %d: %s%s", epoch, self.iteration,
            describe_problems(recent, "skipped") or "no unreadable images", describe_problems(excluded, "; excluded by the scan"))
        self.accelerator.log({"data/epoch": epoch, "data/skipped_images_in_epoch": sum(recent.values()),
                              "data/excluded_by_scan": sum(excluded.values())}, step=self.iteration)

    def run(self) -> TrainResult:
        cfg, accelerator = self.cfg, self.accelerator
        if accelerator.is_main_process:
            cfg.dump(str(self.work_dir / f"{cfg.config_name}.py"))
        accelerator.init_trackers("pgv25", config=flat_config(cfg), init_kwargs=tracker_options(cfg, self.work_dir))
        log_every = int(cfg.default_hooks.logger.interval)
        save_every = int(cfg.default_hooks.checkpoint.interval)
        logger.info(
            "training %s: %d iterations; %d process(es) (%s) × batch %d × %d accumulation = %d samples per update at lr %.2e; "
            "%s; work dir %s",
            cfg.config_name, self.max_iters, self.world_size, self.runtime.strategy if self.world_size > 1 else "single",
            self.data.batch_size, self.optim.accumulation, self.world_size * self.data.batch_size * self.optim.accumulation,
            cfg.optim_wrapper.optimizer.lr, self.objective.describe(), self.work_dir,
        )
        self._report_scan()
        # a streaming dataset's epochs are per loader worker and of unknown length: no summary line
        epoch_iters = math.inf if self.data.streaming else max(1, self.sampler.steps_per_epoch // self.optim.accumulation)
        result = TrainResult(self.iteration)
        window_losses, window_images, window_start, run_start = [], 0, time.time(), time.time()
        self._summary_shown_at = run_start  # when an epoch summary last reached the terminal
        start_iteration = self.iteration
        if self.iteration == 0:
            self._validate()  # the starting point, to compare every later grid with
        with GracefulStop() as stop:
            while self.iteration < self.max_iters:
                try:
                    step = self.step(stop.requested)
                except torch.OutOfMemoryError:
                    raise self._out_of_memory(result.checkpoint) from None
                self.iteration += 1
                self._check_finite(step)
                if self.ema is not None and not step.nonfinite:
                    self.ema.update(self.iteration)
                if not step.nonfinite:
                    window_losses.append(step.loss)
                window_images += step.images
                if self.iteration % epoch_iters == 0:
                    self._epoch_summary(self.iteration // epoch_iters)
                if self.iteration % log_every == 0 or self.iteration == self.max_iters:
                    seconds_per_iter = (time.time() - run_start) / (self.iteration - start_iteration)
                    self._log(window_losses, window_images, time.time() - window_start, seconds_per_iter, step.grad_norm)
                    window_losses, window_images, window_start = [], 0, time.time()
                if self.validation.due(self.iteration):
                    self._validate()
                if self.iteration % save_every == 0 or self.iteration == self.max_iters:
                    result.checkpoint, result.step_dir = self.save()
                elif step.stop:
                    result.checkpoint, _ = self.save(export=False)
                if step.stop:
                    result.stopped_by = stop.received or "a signal on another process"
                    break
        result.iteration = self.iteration
        if result.checkpoint is None and not result.stopped_by:  # resumed at or past max_iters: export what we have
            result.checkpoint, result.step_dir = self.save()
        # Not accelerator.end_training(): it also destroys the process group, after which freeing the
        # DDP model tears gloo down with the GIL held and can deadlock (see cli.exit_now).
        for tracker in accelerator.trackers:
            tracker.finish()
        if self._log_file is not None:
            logger.removeHandler(self._log_file)
            train_log_only.removeHandler(self._log_file)
            self._log_file.close()
        self.release()
        return result

    def _out_of_memory(self, checkpoint) -> UserError:
        peak = torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else None
        self.optim.optimizer.zero_grad(set_to_none=True)  # let the memory go before anything else runs
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        last = checkpoint or self._latest_checkpoint()
        return UserError(out_of_memory_message(self.iteration + 1, self.data.batch_size, getattr(self, "_batch_shape", None),
                                               peak, last))

    def _latest_checkpoint(self):
        from .checkpoint import latest_checkpoint

        return latest_checkpoint(self.work_dir / "checkpoints")

    def sample_grid(self, step_dir: Path) -> Path | None:
        """Generate the configured prompts from the exported pipeline and save a labelled grid."""
        options = self.cfg.get("sample_grid") or {}
        specs = sample_specs(self.cfg)
        if not specs or not self.accelerator.is_main_process:
            return None
        if self.lora is not None:  # the base pipeline with the exported LoRA, as a user would load it
            pipe = load_pipeline(self.base_folder, options.get("scheduler", "dpmpp"), device=str(self.device), lora=step_dir)
        else:
            sampler = "native" if self.export_scheduler is not None else options.get("scheduler", "dpmpp")
            pipe = load_pipeline(step_dir, sampler, device=str(self.device))
        out = self.work_dir / f"samples_{step_dir.name}.png"
        labelled_grid(generate_specs(pipe, specs), [spec.label for spec in specs]).save(out)
        logger.info("sample grid from %s: %s", step_dir, out)
        return out


def sample_specs(cfg) -> list:
    """`sample_grid.prompts` as PromptSpecs (strings or per-prompt dicts), defaults from `sample_grid`."""
    options = cfg.get("sample_grid") or {}
    resolution = cfg.train_dataloader.dataset.get("resolution")
    defaults = {"seed": options.get("seed", 0), "steps": options.get("steps", 50), "guidance_scale": options.get("guidance_scale", 3.0),
                "negative_prompt": options.get("negative_prompt"), "width": options.get("width") or resolution,
                "height": options.get("height") or resolution}
    return prompt_specs(options.get("prompts"), defaults, "sample_grid.prompts")


def train(cfg, resume: str | bool | None = None, allow_config_change: bool = False) -> TrainResult:
    """Train, export and write the sample grid (not when stopped by a signal)."""
    trainer = Trainer(cfg, resume, allow_config_change)
    result = trainer.run()
    if result.step_dir is not None and not result.stopped_by:
        result.grid = trainer.sample_grid(result.step_dir)
    return result
