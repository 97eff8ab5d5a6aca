"""The training loop: build everything from the config, train the UNet with EDM, checkpoint, export.

accelerate owns devices, mixed precision and (later) distribution; this file owns the order of
things. One iteration = one optimizer update of `accumulative_counts` micro-batches.
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

from .. import edm
from ..data.dataset import build_dataset, collate
from ..data.sampler import ResumableSampler
from ..errors import UserError
from ..generate import generate, labelled_grid, load_pipeline
from ..models.edm_denoiser import Conditioning, EDMDenoiser, EDMLoss
from ..models.latent_codec import LatentCodec
from ..models.loading import load_components
from ..models.text_conditioner import TextConditioner
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .export import DTYPES, export_pipeline

logger = logging.getLogger("pgv25")


def work_dir_of(cfg) -> Path:
    return Path(cfg.get("work_dir") or Path("work_dirs") / cfg.config_name)


def ensure_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write_test{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise UserError(f"work dir {folder} is not writable: {error.strerror or error}") from None


@dataclass
class Batches:
    """Endless batches from the loader; a batch whose every image was unreadable is skipped and counted."""

    loader: torch.utils.data.DataLoader
    consumed: int = 0  # batches taken from the sampler stream (the data position)
    skipped: int = 0  # unreadable samples so far

    def __post_init__(self):
        self._iterator = iter(self.loader)

    def __next__(self) -> dict:
        while True:
            batch = next(self._iterator)
            self.consumed += 1
            self.skipped += batch["skipped"]
            if batch["size"]:
                return batch


def build_optimizer(params, cfg: dict, use_fused: bool):
    options = dict(cfg)
    kind = options.pop("type", "AdamW")
    if kind != "AdamW":
        raise UserError(f"optim_wrapper.optimizer.type '{kind}' is not supported yet; use AdamW")
    if "betas" in options:
        options["betas"] = tuple(options["betas"])
    return torch.optim.AdamW(params, fused=use_fused or None, **options)


def build_lr_scheduler(optimizer, cfg: dict, max_iters: int):
    from diffusers.optimization import get_scheduler

    options = dict(cfg)
    name = options.pop("type", "constant")
    warmup = options.pop("warmup_iters", 0)
    try:
        return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=max_iters, **options)
    except (ValueError, TypeError) as error:
        raise UserError(f"param_scheduler: {error}") from None


class Trainer:
    """Holds the built pieces; `run()` trains to `train_cfg.max_iters`."""

    def __init__(self, cfg, resume: str | bool | None = None):
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        self.cfg = cfg
        self.work_dir = work_dir_of(cfg)
        ensure_writable(self.work_dir)
        self.seed = int(cfg.randomness.seed)
        on_gpu = torch.cuda.is_available()
        optim_cfg = cfg.optim_wrapper
        self.accumulation = int(optim_cfg.get("accumulative_counts", 1))
        self.accelerator = Accelerator(
            mixed_precision=optim_cfg.get("mixed_precision", "no") if on_gpu else "no",  # fp32 on a CPU
            cpu=not on_gpu,  # under torchrun without CUDA this gives real gloo training, not N lone processes
            log_with="tensorboard",
            project_dir=str(self.work_dir),
        )
        set_seed(self.seed)
        self.device = self.accelerator.device
        if self.accelerator.is_main_process:
            self._log_file = logging.FileHandler(self.work_dir / "train.log")
            self._log_file.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
            logger.addHandler(self._log_file)
        if cfg.get("tiny_assets"):
            from ..tiny import ensure_tiny_assets

            ensure_tiny_assets(**cfg.tiny_assets)

        # Data before model: a wrong column or an empty dataset fails before gigabytes load.
        loader_cfg = cfg.train_dataloader
        self.dataset = build_dataset(loader_cfg.dataset, self.seed)
        self.batch_size = int(loader_cfg.batch_size)

        model_cfg = cfg.model
        weight_dtype = DTYPES[model_cfg.get("weight_dtype", "fp32")] if on_gpu else torch.float32
        parts = load_components(model_cfg.pretrained_model_name_or_path, weight_dtype)
        self.base_folder = parts.source
        self.scheduler_config = parts.scheduler_config
        self.conditioner = TextConditioner(
            [parts.tokenizer, parts.tokenizer_2], [parts.text_encoder, parts.text_encoder_2], parts.force_zeros_for_empty_prompt
        ).to(self.device)
        vae_dtype = DTYPES[model_cfg.get("vae_dtype", "fp32")] if on_gpu else torch.float32
        self.codec = LatentCodec(parts.vae.to(self.device, vae_dtype))
        self.codec.to(self.device)
        unet = parts.unet.train()
        if model_cfg.get("gradient_checkpointing"):
            unet.enable_gradient_checkpointing()
        denoiser = EDMDenoiser(
            unet, parts.scheduler_config.get("sigma_data", 0.5), parts.scheduler_config.get("prediction_type", "epsilon")
        )
        sampler_cfg = dict(model_cfg.get("sigma_sampler", {"type": "karras_index"}))
        self.sigma_sampler = edm.build_sigma_sampler(sampler_cfg.pop("type"), parts.scheduler_config, **sampler_cfg)
        self.weighting = model_cfg.get("loss_weighting", "none")
        objective = EDMLoss(denoiser, self.weighting)

        self.max_iters = int(cfg.train_cfg.max_iters)
        optimizer = build_optimizer(unet.parameters(), optim_cfg.optimizer, use_fused=on_gpu)
        self.lr_scheduler = build_lr_scheduler(optimizer, cfg.get("param_scheduler", {}), self.max_iters)
        self.objective, self.optimizer = self.accelerator.prepare(objective, optimizer)
        self.generator = torch.Generator(self.device).manual_seed(self.seed + self.accelerator.process_index)

        self.iteration, start_batches, skipped = 0, 0, 0
        checkpoint = self._checkpoint_to_resume(resume)
        if checkpoint is not None:
            state = load_checkpoint(checkpoint, self.unet, self.optimizer, self.lr_scheduler, self.generator)
            self.iteration, start_batches, skipped = state["iteration"], state["batches_consumed"], state["skipped"]
            logger.info("resumed from %s at iteration %d", checkpoint, self.iteration)
        self.batches = Batches(self._loader(start_batches), consumed=start_batches, skipped=skipped)

    @property
    def unet(self):
        return self.accelerator.unwrap_model(self.objective).denoiser.unet

    def _checkpoint_to_resume(self, resume) -> Path | None:
        if not resume:
            return None
        if resume is True:
            found = latest_checkpoint(self.work_dir / "checkpoints")
            if found is None:
                logger.info("--resume: no checkpoint in %s yet; starting from the beginning", self.work_dir / "checkpoints")
            return found
        path = Path(resume)
        if not path.is_dir():
            raise UserError(f"--resume: checkpoint {path} does not exist")
        return path

    def _loader(self, start_batches: int):
        sampler = ResumableSampler(
            len(self.dataset), self.seed, rank=self.accelerator.process_index,
            world_size=self.accelerator.num_processes, start=start_batches * self.batch_size,
        )
        workers = int(self.cfg.train_dataloader.get("num_workers", 0))
        return torch.utils.data.DataLoader(
            self.dataset, batch_size=self.batch_size, sampler=sampler, num_workers=workers, collate_fn=collate,
            pin_memory=self.device.type == "cuda", persistent_workers=workers > 0,
        )

    def micro_step(self, batch: dict) -> torch.Tensor:
        """One forward/backward of the EDM loss on a batch; returns the (detached) mean loss."""
        pixels = batch["pixels"].to(self.device, non_blocking=True)
        x0 = self.codec.encode(pixels, self.generator)
        prompt_embeds, pooled = self.conditioner(batch["captions"], batch["drop_caption"])
        cond = Conditioning(prompt_embeds, pooled, batch["time_ids"].to(self.device, prompt_embeds.dtype))
        sigma = self.sigma_sampler(len(x0), self.generator, self.device)
        noise = torch.randn(x0.shape, generator=self.generator, device=self.device)
        with self.accelerator.autocast():
            loss = self.objective(x0, sigma, noise, cond).mean()
        self.accelerator.backward(loss / self.accumulation)
        return loss.detach()

    def step(self) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """One optimizer update; returns (mean loss, grad norm, images used)."""
        losses, images = [], 0
        for micro in range(self.accumulation):
            batch = next(self.batches)
            last = micro == self.accumulation - 1
            with contextlib.nullcontext() if last else self.accelerator.no_sync(self.objective):
                losses.append(self.micro_step(batch))
            images += batch["size"]
        clip = (self.cfg.optim_wrapper.get("clip_grad") or {}).get("max_norm")
        grad_norm = self.accelerator.clip_grad_norm_(self.objective.parameters(), clip) if clip else None
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return torch.stack(losses).mean(), grad_norm, images

    def save(self) -> Path:
        """A resumable checkpoint and a diffusers export of the current UNet (rank 0 writes)."""
        self.accelerator.wait_for_everyone()
        step_dir = self.work_dir / f"step{self.iteration}"
        if self.accelerator.is_main_process:
            checkpoint = save_checkpoint(
                self.work_dir / "checkpoints", self.iteration, self.unet.state_dict(), self.optimizer, self.lr_scheduler,
                self.generator, {"batches_consumed": self.batches.consumed, "skipped": self.batches.skipped,
                                 "config": self.cfg.config_name},
            )
            export_pipeline(self.unet, self.base_folder, step_dir, self.cfg.get("export", {}).get("dtype", "fp32"))
            logger.info("iteration %d: checkpoint %s, export %s", self.iteration, checkpoint, step_dir)
        self.accelerator.wait_for_everyone()
        return step_dir

    def run(self) -> Path:
        cfg, accelerator = self.cfg, self.accelerator
        if accelerator.is_main_process:
            cfg.dump(str(self.work_dir / f"{cfg.config_name}.py"))
        accelerator.init_trackers("tensorboard")
        log_every = int(cfg.default_hooks.logger.interval)
        save_every = int(cfg.default_hooks.checkpoint.interval)
        logger.info(
            "training %s: %d iterations, %d process(es) × batch %d × %d accumulation = %d images per update; "
            "σ sampler %s (median σ %.2f), loss weighting %s; work dir %s",
            cfg.config_name, self.max_iters, accelerator.num_processes, self.batch_size, self.accumulation,
            accelerator.num_processes * self.batch_size * self.accumulation, type(self.sigma_sampler).__name__,
            edm.median_sigma(self.sigma_sampler), self.weighting, self.work_dir,
        )
        step_dir = None
        window_losses, window_images, window_start, run_start = [], 0, time.time(), time.time()
        start_iteration = self.iteration
        while self.iteration < self.max_iters:
            loss, grad_norm, images = self.step()
            self.iteration += 1
            window_losses.append(loss)
            window_images += images
            if self.iteration % log_every == 0 or self.iteration == self.max_iters:
                mean_loss = float(torch.stack(window_losses).mean())  # one host sync per log line
                if not math.isfinite(mean_loss):
                    raise UserError(f"loss became {mean_loss} by iteration {self.iteration}; lower optim_wrapper.optimizer.lr")
                elapsed = time.time() - window_start
                rate = window_images * accelerator.num_processes / max(elapsed, 1e-9)
                seconds_per_iter = (time.time() - run_start) / (self.iteration - start_iteration)
                eta = int(seconds_per_iter * (self.max_iters - self.iteration))
                lr = self.lr_scheduler.get_last_lr()[0]
                logger.info(
                    "iter %d/%d  loss %.4f  lr %.2e  %.1f img/s  eta %d:%02d:%02d%s", self.iteration, self.max_iters,
                    mean_loss, lr, rate, eta // 3600, eta // 60 % 60, eta % 60,
                    f"  skipped {self.batches.skipped}" if self.batches.skipped else "",
                )
                metrics = {"loss": mean_loss, "lr": lr, "images_per_s": rate}
                if grad_norm is not None:
                    metrics["grad_norm"] = float(grad_norm)
                accelerator.log(metrics, step=self.iteration)
                window_losses, window_images, window_start = [], 0, time.time()
            if self.iteration % save_every == 0 or self.iteration == self.max_iters:
                step_dir = self.save()
        accelerator.end_training()
        if accelerator.is_main_process:
            logger.removeHandler(self._log_file)
            self._log_file.close()
        if step_dir is None:  # resumed at or past max_iters: nothing trained, export what we have
            step_dir = self.save()
        return step_dir

    def sample_grid(self, step_dir: Path) -> Path | None:
        """Generate the configured prompts from the exported pipeline and save a labelled grid."""
        options = self.cfg.get("sample_grid") or {}
        prompts = list(options.get("prompts") or [])
        if not prompts or not self.accelerator.is_main_process:
            return None
        resolution = self.cfg.train_dataloader.dataset.get("resolution")
        pipe = load_pipeline(step_dir, options.get("scheduler", "dpmpp"), device=str(self.device))
        images = generate(
            pipe, prompts, seed=options.get("seed", 0), steps=options.get("steps", 50),
            guidance_scale=options.get("guidance_scale", 3.0),
            width=options.get("width") or resolution, height=options.get("height") or resolution,
        )
        out = self.work_dir / f"samples_{step_dir.name}.png"
        labelled_grid(images, prompts).save(out)
        logger.info("sample grid from %s: %s", step_dir, out)
        return out


def train(cfg, resume: str | bool | None = None) -> tuple[Path, Path | None]:
    """Train, export and write the sample grid; returns (last export folder, grid path)."""
    trainer = Trainer(cfg, resume)
    step_dir = trainer.run()
    return step_dir, trainer.sample_grid(step_dir)
