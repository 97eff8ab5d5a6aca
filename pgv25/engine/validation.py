"""Validation samples during training: fixed prompts and seeds, the pipeline's own sampler.

Every `validation.interval` iterations, and before the first, the UNet being trained (and its EMA,
when there is one) generates one image per prompt; a labelled grid goes to
`work_dir/validation/iter_<N>.png` and to the trackers. The pipeline is built once around the
training UNet itself (no copy of the weights) with the base model's frozen parts, which wait on
the CPU between rounds on a GPU machine. Sampling runs under `torch.random.fork_rng` with its own
seeded generators, so the training RNG stream, and with it exact resume, is untouched.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from ..generate import generate_specs, labelled_grid, load_pipeline

logger = logging.getLogger("pgv25")


class ValidationSampler:
    def __init__(self, options, base_folder: str, unet, ema, device: torch.device, dtype: torch.dtype,
                 autocast, work_dir: Path, text_encoders=None, scheduler=None):
        """`options`: engine.options.ValidationOptions (interval, prompt specs, sampler, raw_and_ema)."""
        self.interval = options.interval
        self.specs = list(options.specs)
        self.prompts = [spec.label for spec in self.specs]
        self.scheduler = options.scheduler
        self.own_scheduler = scheduler  # a DDPM-schedule run samples on its own schedule
        self.last: tuple[int, list, list] | None = None  # (iteration, specs, images of the exported weights)
        self.show_raw = options.raw_and_ema
        self.base_folder, self.unet, self.ema = base_folder, unet, ema
        self.text_encoders = text_encoders  # the trained ones (text-encoder LoRA), else the base model's
        self.device, self.dtype, self.autocast = device, dtype, autocast
        self.folder = work_dir / "validation"
        self._pipe = None

    @property
    def enabled(self) -> bool:
        return self.interval > 0 and bool(self.prompts)

    def due(self, iteration: int) -> bool:
        return self.enabled and iteration % self.interval == 0

    def _pipeline(self):
        if self._pipe is None:
            trained = dict(zip(("text_encoder", "text_encoder_2"), self.text_encoders or ()))
            self._pipe = load_pipeline(self.base_folder, self.scheduler, device="cpu", dtype=self.dtype, unet=self.unet, **trained)
            if self.own_scheduler is not None:
                self._pipe.scheduler = self.own_scheduler
        return self._pipe

    def _images(self) -> list:
        return generate_specs(self._pipeline(), self.specs)

    @torch.no_grad()
    def run(self, iteration: int, trackers=(), exported: str = "ema") -> Path:
        """Generate the grid for `iteration`; the UNet is back in training mode, with its own weights, afterwards."""
        pipe = self._pipeline()
        frozen = [pipe.vae] + ([] if self.text_encoders else [pipe.text_encoder, pipe.text_encoder_2])  # trained ones stay put
        for module in frozen:
            module.to(self.device)
        was_training = self.unet.training
        self.unet.eval()
        rng_devices = [self.device] if self.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=rng_devices), self.autocast():
                rows, labels, ema, raw = [], [], None, None
                if self.ema is not None:
                    with self.ema.applied():
                        ema = self._images()
                    rows, labels = rows + ema, labels + [f"EMA: {p}" for p in self.prompts]
                if self.ema is None or self.show_raw or exported == "model":
                    raw = self._images()
                    if self.ema is None or self.show_raw:
                        rows += raw
                        labels += [f"raw: {p}" if self.ema is not None else p for p in self.prompts]
                # what an export made at this iteration holds: its model card shows these
                self.last = (iteration, self.specs, ema if ema is not None and exported == "ema" else raw)
        finally:
            self.unet.train(was_training)
            if self.device.type != "cpu":
                for module in frozen:
                    module.to("cpu")
        grid = labelled_grid(rows, labels, columns=len(self.prompts))
        self.folder.mkdir(parents=True, exist_ok=True)
        out = self.folder / f"iter_{iteration:07d}.png"
        grid.save(out)
        for tracker in trackers:
            log_image(tracker, grid, iteration)
        logger.info("iteration %d: validation samples %s", iteration, out)
        return out


def log_image(tracker, image, step: int) -> None:
    """The grid as an image in TensorBoard (or W&B) at `step`."""
    if tracker.name == "tensorboard":
        tracker.writer.add_image("validation", np.asarray(image), step, dataformats="HWC")
        tracker.writer.flush()
    elif tracker.name == "wandb":
        import wandb

        tracker.tracker.log({"validation": wandb.Image(image)}, step=step)

