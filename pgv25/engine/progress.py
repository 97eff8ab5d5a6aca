"""What a run tells its user: train.log, the progress line, scalars.jsonl and the trackers, the scan's
report, one summary per epoch, and the line an out-of-memory ends a run with.

Rank 0 writes the files; the collectives here (the mean loss, the epoch's skipped images) run on every
rank at the same iterations, so the processes never wait on each other in different places.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import Counter
from pathlib import Path

import torch

from ..data.index import describe_problems, problem_lines
from . import distributed

logger = logging.getLogger("pgv25")
SCALARS = "scalars.jsonl"  # one JSON line per logged iteration, full precision (for plots and checks)
SKIPPED_FILES = "skipped_files.txt"  # reason<TAB>path of every image or row left out
TRAIN_LOG_ONLY = "pgv25.train_log"  # a logger whose lines reach train.log but not the terminal
train_log_only = logging.getLogger(TRAIN_LOG_ONLY)
train_log_only.propagate = False
train_log_only.setLevel(logging.INFO)
EPOCH_SUMMARY_EVERY_S = 600  # an epoch summary with nothing new reaches the terminal at most this often


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


def out_of_memory_message(iteration: int, batch_size: int, shape, peak_gib: float | None, checkpoint) -> str:
    """The one line a CUDA out-of-memory ends a run with: where, how big, and what to switch on."""
    where = f"a batch of {shape[0]} images at {shape[1]}×{shape[2]}" if shape else f"batch_size {batch_size}"
    peak = f"; peak {peak_gib:.1f} GiB allocated" if peak_gib is not None else ""
    kept = f"the last checkpoint, {checkpoint}, is untouched" if checkpoint else "no checkpoint was written yet"
    return (f"iteration {iteration}: out of GPU memory on {where} (train_dataloader.batch_size={batch_size} per process){peak}. "
            "Try model.gradient_checkpointing=True, a smaller train_dataloader.batch_size with "
            "optim_wrapper.accumulative_counts to keep the batch, optim_wrapper.optimizer.type=AdamW8bit or Adafactor, "
            f"or model.lora.enabled=True (`pgv25 plan CONFIG` lists the combinations that fit); {kept}")


class Progress:
    """The log of one run: a window of losses between progress lines, and where its lines go."""

    def __init__(self, accelerator, work_dir: Path, max_iters: int, device: torch.device):
        self.accelerator, self.work_dir, self.max_iters, self.device = accelerator, work_dir, max_iters, device
        self.main = accelerator.is_main_process
        self.loader_wait = 0.0  # seconds spent waiting for the loader since the last progress line
        self._log_file = None
        if self.main:  # train.log in the work dir, written by rank 0; the other ranks log warnings only
            self._log_file = logging.FileHandler(work_dir / "train.log")
            self._log_file.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
            logger.addHandler(self._log_file)
            train_log_only.addHandler(self._log_file)  # routine lines (an epoch with nothing to report) go only there
        else:
            logger.setLevel(logging.WARNING)  # one progress log per run, from rank 0

    def start(self, iteration: int) -> None:
        self.window_losses, self.window_images = [], 0
        self.window_start = self.run_start = self.summary_shown_at = time.time()
        self.start_iteration = iteration

    def add(self, loss: torch.Tensor | None, images: int) -> None:
        """One update's loss (None: the update was skipped) and images, into the current window."""
        if loss is not None:
            self.window_losses.append(loss)
        self.window_images += images

    def log(self, iteration: int, lr: float, grad_norm, metrics: dict, skipped_images: int, skipped_updates: int) -> None:
        """A progress line, tracker scalars and a scalars.jsonl line (a collective: the loss is the mean over ranks)."""
        now = time.time()
        elapsed = now - self.window_start
        seconds_per_iter = (now - self.run_start) / max(1, iteration - self.start_iteration)
        window = torch.stack(self.window_losses).mean() if self.window_losses else torch.tensor(math.nan, device=self.device)
        mean_loss = float(distributed.mean_over_ranks(window.float()))
        rate = self.window_images * self.accelerator.num_processes / max(elapsed, 1e-9)
        eta = int(seconds_per_iter * (self.max_iters - iteration))
        extra = (f"  skipped images {skipped_images}" if skipped_images else "") + (
            f"  skipped updates {skipped_updates}" if skipped_updates else "")
        logger.info("iter %d/%d  loss %.4f  lr %.2e  %.1f img/s  eta %d:%02d:%02d%s", iteration, self.max_iters,
                    mean_loss, lr, rate, eta // 3600, eta // 60 % 60, eta % 60, extra)
        scalars = {"loss": mean_loss, "lr": lr, "images_per_s": rate, "grad_norm": float(grad_norm), **metrics,
                   # the share of the window this rank sat waiting for the loader (near 0: the loader keeps up)
                   "loader_wait": min(1.0, self.loader_wait / max(elapsed, 1e-9))}
        if self.device.type == "cuda":
            scalars["gpu_peak_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.record(iteration, scalars)
        self.window_losses, self.window_images, self.window_start, self.loader_wait = [], 0, time.time(), 0.0

    def record(self, iteration: int, scalars: dict) -> None:
        """Scalars to the trackers and, from rank 0, a scalars.jsonl line (training's, or a measurement's beside it)."""
        self.accelerator.log(scalars, step=iteration)
        if self.main:
            with open(self.work_dir / SCALARS, "a") as f:
                f.write(json.dumps({"iteration": iteration, **scalars}) + "\n")

    def truncate_scalars(self, iteration: int) -> None:
        """Drop lines logged after `iteration` by an interrupted run; they will be logged again."""
        path = self.work_dir / SCALARS
        if self.main and path.is_file():
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["iteration"] <= iteration]
            path.write_text("".join(line + "\n" for line in kept))

    def report_scan(self, plan, dataset_path, fresh: bool) -> None:
        """Log the buckets and the rows the scan left out; start the skipped-files list on a fresh run."""
        if plan is None:
            logger.info("streaming %s: rows are bucketed as they arrive", dataset_path)
            return
        histogram = ", ".join(f"{w}x{h}: {n}" for (w, h), n in plan.histogram())
        logger.info("%d %s in %d bucket(s) (%s)%s", len(plan.index), "pairs" if plan.rows.pairs else "images", len(plan.sizes), histogram,
                    describe_problems(plan.index.reasons(), "; the scan excluded"))
        if self.main and fresh:
            (self.work_dir / SKIPPED_FILES).write_text(problem_lines(plan.index.problems))
            if plan.index.problems:
                logger.info("excluded rows and their reasons: %s", self.work_dir / SKIPPED_FILES)

    def epoch_summary(self, epoch: int, iteration: int, recent: Counter, excluded: Counter) -> None:
        """One line per epoch (a collective): images skipped on all ranks since the last one, by reason.

        Always in train.log and the trackers; in the terminal only when images were skipped in this epoch, or
        when the last summary shown there is EPOCH_SUMMARY_EVERY_S old (a short epoch would print a line a minute).
        """
        counts = Counter()
        for rank_counts in distributed.gather_objects(dict(recent)):
            counts.update(rank_counts)
        show = bool(counts) or time.time() - self.summary_shown_at >= EPOCH_SUMMARY_EVERY_S
        if show:
            self.summary_shown_at = time.time()
        (logger if show else train_log_only).info(
            "epoch %d done at iteration %d: %s%s", epoch, iteration,
            describe_problems(counts, "skipped") or "no unreadable images", describe_problems(excluded, "; excluded by the scan"))
        self.accelerator.log({"data/epoch": epoch, "data/skipped_images_in_epoch": sum(counts.values()),
                              "data/excluded_by_scan": sum(excluded.values())}, step=iteration)

    def close(self) -> None:
        if self._log_file is not None:
            logger.removeHandler(self._log_file)
            train_log_only.removeHandler(self._log_file)
            self._log_file.close()
            self._log_file = None
