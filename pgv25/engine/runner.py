"""The training loop: build everything from the config, train the UNet with EDM, checkpoint, export.

accelerate owns devices, mixed precision and the process group; `distributed.py` owns how the UNet
is spread over processes; this file owns the order of things. One iteration = one optimizer update
of `accumulative_counts` micro-batches on every process. What a step minimises is the objective's
(objectives/); saving and exporting are saving.py's, the log progress.py's, the options options.py's.

Every decision that could differ between processes (skip a non-finite update, stop on a signal,
save) is either a function of the iteration number or OR-ed over all ranks first, so the
processes never disagree about what happens next.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError
from ..models.speed import attention_backend
from ..objectives import batch_inputs, build_objective
from . import distributed, saving
from .batches import Batches, make_loader
from .build import build_data, build_model, build_optimisation, build_runtime
from .checkpoint import latest_checkpoint, set_rng_state
from .ema import build_ema
from .locks import WorkDirLock
from .optim import eval_weights
from .options import read_options
from .plan import warn_if_too_large
from .progress import SCALARS, SKIPPED_FILES, Progress, flat_config, out_of_memory_message
from .resume import chosen_checkpoint, fingerprint, restore
from .signals import GracefulStop
from .validation import ValidationSampler
from .validation_loss import ValidationLoss

logger = logging.getLogger("pgv25")


def ensure_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write_test{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise UserError(f"work dir {folder} is not writable: {error.strerror or error}") from None


@dataclass
class StepResult:
    loss: torch.Tensor  # this rank's mean loss over the micro-batches
    grad_norm: torch.Tensor
    images: int  # this rank's images
    nonfinite: bool  # the update was skipped (loss or gradient not finite on some rank)
    stop: bool  # some rank received SIGINT/SIGTERM
    zeroed: int = 0  # fused_backward: parameter tensors whose non-finite gradient was taken as zero (the rest updated)


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
        self.options = read_options(cfg)  # every option checked before any data or model loads
        self.work_dir = self.options.train.work_dir
        ensure_writable(self.work_dir)
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
        options = self.options
        self.seed, self.max_iters = options.train.seed, options.train.max_iters
        self.runtime = runtime = build_runtime(options, self.work_dir)
        self.accelerator, self.device = runtime.accelerator, runtime.device
        self.rank, self.world_size, self.sharded = runtime.rank, runtime.world_size, runtime.sharded
        self.progress = Progress(self.accelerator, self.work_dir, self.max_iters, self.device)
        if self.device.type == "cuda" and self.rank == 0:  # one line now rather than an out-of-memory error at step 1
            warn_if_too_large(options, self.world_size)
        checkpoint = chosen_checkpoint(self.accelerator, resume, self.work_dir)  # a damaged one is found before gigabytes load
        self.data = build_data(options, runtime)
        self.model = build_model(options, runtime, self.data.cached, len(self.data.plan.sizes) if self.data.plan else 32)
        self.objective = build_objective(options.objective, options.model.section, self.model, self.device)
        self.export_scheduler = self.objective.schedule.export_scheduler
        self.validation_loss = None if not self.data.held_out else ValidationLoss(
            options.validation.loss, self.data.held_out, self.model, self.objective.schedule, self.device,
            self.runtime.autocast, self.work_dir)
        self.optim = build_optimisation(options, runtime, self.model, self.objective)
        self.generator = torch.Generator(self.device).manual_seed(self.seed + self.rank)
        self._build_hooks()
        self.iteration = 0
        self.skipped_saves = 0  # saves in a row skipped for want of disk space
        self.nonfinite_total = 0  # skipped updates so far
        self.nonfinite_run = 0  # consecutive skipped updates
        self.fingerprint = fingerprint(cfg, self.world_size)
        position, rng, stream = (0, 0), None, None
        if checkpoint is not None:
            position, rng, stream = restore(self, checkpoint, allow_config_change)
        # An earlier attempt's lines past this point are logged again (from scratch: all of them, iteration 0's included)
        self.progress.truncate_scalars(self.iteration if checkpoint is not None else -1)
        self.batches = Batches(self._loader(position[0], stream), consumed=position[0], skipped=position[1],
                               log_path=self.work_dir / SKIPPED_FILES)
        if rng is not None:  # last: building the loader iterator draws from the global torch RNG
            set_rng_state(rng, self.generator, self.optim.updates.generator)

    # The parts tests and tools reach for by name.
    unet = property(lambda self: self.model.unet)
    trained = property(lambda self: self.model.trained)
    conditioner = property(lambda self: self.model.conditioner)
    codec = property(lambda self: self.model.codec)
    base_folder = property(lambda self: self.model.base_folder)
    lora = property(lambda self: self.model.lora)
    export_ema = property(lambda self: self.options.ema.export)

    def _build_hooks(self) -> None:
        """EMA of what trains and the validation sampler."""
        # DDP keeps identical weights on every rank, so rank 0's EMA is the EMA; the others keep none.
        self.ema = build_ema(self.trained, self.options.ema.settings) if self.accelerator.is_main_process else None
        model = self.model
        self.validation = ValidationSampler(self.options.validation, model.base_folder, model.unet, self.ema, self.device,
                                            model.cond_dtype, self.runtime.autocast, self.work_dir,
                                            list(model.conditioner.text_encoders) if model.text_lora else None,
                                            self.export_scheduler)
        if self.validation.enabled and self.sharded:  # a sharded UNet cannot sample on rank 0 alone
            logger.warning("validation samples are not made with strategy='fsdp' yet; the final sample grid still comes from the export")
            self.validation.interval = 0

    def _loader(self, start_batches: int, stream_resume: dict | None = None):
        loader, self.sampler = make_loader(self.data, self.options.data.num_workers, self.seed, self.rank, self.world_size,
                                           start_batches, self.device.type == "cuda", stream_resume)
        return loader

    def run(self) -> TrainResult:
        cfg, accelerator, options, progress = self.cfg, self.accelerator, self.options, self.progress
        if accelerator.is_main_process:
            cfg.dump(str(self.work_dir / f"{cfg.config_name}.py"))
        # TensorBoard hides what an interrupted attempt logged past this start (the validation grid at 0 included), so
        # its dashboards show one curve; scalars.jsonl was cut the same way in _build.
        purge = {"tensorboard": {"purge_step": self.iteration + 1 if self.iteration else 0}}
        accelerator.init_trackers("pgv25", config=flat_config(cfg), init_kwargs={**options.tracker_init, **purge})
        log_every, save_every = options.train.log_every, options.train.save_every
        logger.info(
            "training %s: %d iterations; %d process(es) (%s) × batch %d × %d accumulation = %d samples per update at lr %.2e; "
            "%s; work dir %s",
            cfg.config_name, self.max_iters, self.world_size, self.runtime.strategy if self.world_size > 1 else "single",
            self.data.batch_size, self.optim.accumulation, self.world_size * self.data.batch_size * self.optim.accumulation,
            options.optim.lr, self.objective.describe(), self.work_dir,
        )
        progress.report_scan(self.data.plan, options.data.dataset.get("path"), fresh=self.iteration == 0)
        # a streaming dataset's epochs are per loader worker and of unknown length: no summary line
        epoch_iters = math.inf if self.data.streaming else max(1, self.sampler.steps_per_epoch // self.optim.accumulation)
        result = TrainResult(self.iteration)
        progress.start(self.iteration)
        if self.iteration == 0:
            self._validate()  # the starting point, to compare every later grid and loss with
            self._measure()
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
                progress.add(None if step.nonfinite else step.loss, step.images)
                if self.iteration % epoch_iters == 0:
                    progress.epoch_summary(self.iteration // epoch_iters, self.iteration, self.batches.recent,
                                           self.data.plan.index.reasons())
                    self.batches.recent.clear()
                if self.iteration % log_every == 0 or self.iteration == self.max_iters:
                    progress.log(self.iteration, self.optim.lr_scheduler.get_last_lr()[0], step.grad_norm,
                                 self.objective.metrics(), self.batches.skipped, self.nonfinite_total)
                if self.validation.due(self.iteration):
                    self._validate()
                if self.validation_loss is not None and (self.validation_loss.due(self.iteration) or self.iteration == self.max_iters):
                    self._measure()
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
        if self.validation_loss is not None:
            plotted = self.validation_loss.plot(self.work_dir / SCALARS)
            if plotted:
                logger.info("validation loss curves: %s", plotted)
        # Not accelerator.end_training(): it also destroys the process group, after which freeing the
        # DDP model tears gloo down with the GIL held and can deadlock (see cli.exit_now).
        for tracker in accelerator.trackers:
            tracker.finish()
        progress.close()
        self.release()
        return result

    def _validate(self) -> None:
        """Validation samples on rank 0 (the others wait for it at the next step's all-reduce).

        Samples are a view of training, not training: on a card that holds the training step but not the pipeline
        beside it (the VAE decoding 1024² in fp32 takes gigabytes), running out of memory turns them off for the
        rest of the run with a line instead of ending the run."""
        if not (self.validation.enabled and self.accelerator.is_main_process):
            return
        try:
            with eval_weights(self.optim.optimizer.optimizer, self.optim.trained_params):  # the weights an export holds
                self.validation.run(self.iteration, self.accelerator.trackers, exported=self.export_ema)
            return
        except torch.OutOfMemoryError:
            pass  # out of the handler first: its traceback holds the sampler's activations
        self.validation.interval = 0
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        logger.warning("validation samples at iteration %d ran out of memory on %s; training goes on without them "
                       "(fewer validation.prompts, a smaller validation.width/height, or validation.interval=0 avoid it)",
                       self.iteration, self.device)

    def _measure(self) -> None:
        """The held-out loss (a collective), with the weights an export would hold."""
        if self.validation_loss is not None:
            with eval_weights(self.optim.optimizer.optimizer, self.optim.trained_params):
                metrics = self.validation_loss.measure(self.iteration)
            self.progress.record(self.iteration, metrics)

    def _out_of_memory(self, checkpoint) -> UserError:
        peak = torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else None
        self.optim.optimizer.zero_grad(set_to_none=True)  # let the memory go before anything else runs
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        last = checkpoint or latest_checkpoint(self.work_dir / "checkpoints")
        return UserError(out_of_memory_message(self.iteration + 1, self.data.batch_size, getattr(self, "_batch_shape", None),
                                               peak, last))

    def forward(self, batch: dict) -> torch.Tensor:
        """The objective's mean loss on a batch, with its graph."""
        x0, cond = self.model.inputs(batch, self.device, self.generator)
        extra = batch_inputs(self.objective, batch, self.device)  # what else of the batch the objective reads
        target = batch["time_ids"][0, 4:6].tolist()  # the bucket (h, w) in pixels
        self._batch_shape = (len(x0), int(target[1]), int(target[0]))  # named if this step runs out of memory
        with self.runtime.autocast(), attention_backend(self.options.model.attention_backend):
            return self.optim.step_module(x0, cond, self.generator, **extra).mean()

    def micro_step(self, batch: dict) -> torch.Tensor:
        """One forward/backward of the objective on a batch; returns the (detached) mean loss."""
        loss = self.forward(batch)
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
        if self.optim.updates.fused:
            return self._fused_step(stop_requested)
        losses, images, optim = [], 0, self.optim
        for micro in range(optim.accumulation):
            asked = time.perf_counter()
            batch = next(self.batches)
            self.progress.loader_wait += time.perf_counter() - asked
            with self._gradient_sync(micro == optim.accumulation - 1):
                losses.append(self.micro_step(batch))
            images += len(batch["time_ids"])  # images, not samples: a preference pair is two
        loss = torch.stack(losses).mean()
        grad_norm = self._grad_norm()
        flags = torch.stack([~torch.isfinite(loss), ~torch.isfinite(grad_norm).to(loss.device),
                             torch.tensor(stop_requested, device=loss.device)])
        bad_loss, bad_grad, stop = distributed.any_rank(flags)  # the step's one host sync
        scaler = self.accelerator.scaler
        if scaler is not None and not bad_loss:
            optim.optimizer.step()  # an fp16 overflow (finite loss, inf gradient) is the grad scaler's to skip
        elif not (bad_loss or bad_grad):
            optim.updates.step()  # the optimizer's step, or per parameter in fp32 for bf16 weights
        optim.lr_scheduler.step()
        optim.optimizer.zero_grad(set_to_none=True)
        nonfinite = bad_loss or (bad_grad and scaler is None)
        self.objective.commit(keep=not nonfinite)
        return StepResult(loss, grad_norm, images, nonfinite=nonfinite, stop=stop)

    def _fused_step(self, stop_requested: bool) -> StepResult:
        """One update made inside backward (optim_wrapper.fused_backward, one process, no accumulation): the loss is
        checked before backward, since no update can be taken back once backward has run; a parameter whose gradient
        is not finite is updated with a zero gradient, and the log says how many were."""
        optim, asked = self.optim, time.perf_counter()
        batch = next(self.batches)
        self.progress.loader_wait += time.perf_counter() - asked
        loss = self.forward(batch)
        bad_loss, stop = distributed.any_rank(torch.stack([~torch.isfinite(loss.detach()),
                                                           torch.tensor(stop_requested, device=loss.device)]))
        if bad_loss:
            del loss  # no backward: no parameter moves
            grad_norm, zeroed = torch.tensor(math.nan), 0
        else:
            self.accelerator.backward(loss)  # each parameter is updated in its gradient hook
            grad_norm, bad = optim.updates.take_counts()
            zeroed = int(bad)
            if zeroed:
                logger.warning("iteration %d: %d of %d parameter tensors had a non-finite gradient; updated with a zero "
                               "gradient, the others as usual (fused_backward cannot skip an update already made)",
                               self.iteration + 1, zeroed, len(optim.trained_params))
        optim.lr_scheduler.step()
        self.objective.commit(keep=not bad_loss)
        return StepResult(loss.detach() if not bad_loss else torch.tensor(math.nan), grad_norm, len(batch["time_ids"]),
                          nonfinite=bool(bad_loss), stop=bool(stop), zeroed=zeroed)

    def _check_finite(self, result: StepResult) -> None:
        if not result.nonfinite and not result.zeroed:
            self.nonfinite_run = 0
            return
        self.nonfinite_total += 1
        self.nonfinite_run += 1
        if result.nonfinite:  # (a zeroed fused update was logged as it happened)
            logger.warning("iteration %d: non-finite loss (%s) or gradient norm (%s); update skipped (%d in a row, %d in all)",
                           self.iteration, float(result.loss), float(result.grad_norm), self.nonfinite_run, self.nonfinite_total)
        if self.nonfinite_run >= self.options.train.max_nonfinite:
            raise UserError(
                f"iteration {self.iteration}: {self.options.train.max_nonfinite} consecutive iterations with a non-finite loss or gradient "
                f"(train_cfg.max_nonfinite_iters); stopped without saving them. Resume from the last checkpoint "
                "with a lower optim_wrapper.optimizer.lr or with optim_wrapper.clip_grad set"
            )

    def save(self, export: bool = True) -> tuple[Path | None, Path | None]:
        """A resumable checkpoint and (optionally) a diffusers export (saving.py); all ranks gather, rank 0 writes."""
        return saving.save(self, export)

    def sample_grid(self, step_dir: Path) -> Path | None:
        """The configured prompts, generated from the export, as a labelled grid (saving.py)."""
        return saving.sample_grid(self, step_dir)


def train(cfg, resume: str | bool | None = None, allow_config_change: bool = False) -> TrainResult:
    """Train, export and write the sample grid (not when stopped by a signal)."""
    trainer = Trainer(cfg, resume, allow_config_change)
    result = trainer.run()
    if result.step_dir is not None and not result.stopped_by:
        try:
            result.grid = trainer.sample_grid(result.step_dir)
            return result
        except torch.OutOfMemoryError:
            pass  # out of the handler first: its traceback holds the pipeline's activations
        if trainer.device.type == "cuda":
            torch.cuda.empty_cache()
        # the run is done and exported: the grid is a look at it, made later from the export
        lora = f"--model {trainer.base_folder} --lora {result.step_dir}" if trainer.lora is not None else f"--model {result.step_dir}"
        logger.warning("the sample grid ran out of memory on %s beside the trainer's state; the export is complete: "
                       "pgv25 generate %s --prompt ... --out samples.png makes it", trainer.device, lora)
    return result
