"""A stand-alone EDM training loop written from the procedure diffusers documents for
`--do_edm_style_training` (examples/dreambooth/train_dreambooth_lora_sdxl.py and its README), for
checking pgv25 against the public recipe on the same model, data and steps.

    PGV25_CACHE=/tmp/pgv25 python tools/reference_edm.py --model ~/.cache/pgv25/tiny_shapes/playground-v2.5-tiny \
        --data ~/.cache/pgv25/tiny_shapes/shapes --iters 1500 --out work_dirs/reference_edm

The procedure, step by step:
- images resized (short side) and centre-cropped to the resolution, flipped with p = 0.5;
  `--proportion_empty_prompts` of captions replaced by "" (the scripts' caption dropout);
- latents = `vae.encode(pixels).latent_dist.sample()`, normalised as Playground's VAE config asks:
  (z − latents_mean) · scaling_factor / latents_std;
- prompts through `pipe.encode_prompt` (both CLIP encoders, pooled embedding), add_time_ids
  (original size, crop top-left, target size);
- σ = `scheduler.sigmas[i]` with i uniform over the 1000 training steps of `EDMEulerScheduler` (Karras
  grid), timestep = `scheduler.timesteps[i]` (= c_noise = ¼ ln σ), noisy = latents + σ·noise;
- UNet on `scheduler.precondition_inputs(noisy, σ)`, output through `precondition_outputs(noisy, pred, σ)`;
- target the clean latents, MSE without weighting (the script leaves EDM schedulers unweighted);
- AdamW, gradient-norm clipping at 1.0, `diffusers.optimization.get_scheduler` for the learning rate;
- `pipe.save_pretrained` of the result.
It imports torch, diffusers, numpy and PIL only: no pgv25 code.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


class FolderDataset(torch.utils.data.Dataset):
    """An image folder with metadata.jsonl (file_name, text), as the scripts' `imagefolder` loading reads it."""

    def __init__(self, folder: Path, size: int, proportion_empty_prompts: float = 0.0, seed: int = 0):
        self.rows = [json.loads(line) for line in (Path(folder) / "metadata.jsonl").read_text().splitlines()]
        self.folder, self.size, self.proportion_empty = Path(folder), size, proportion_empty_prompts
        self.rng = random.Random(seed)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        row = self.rows[i]
        image = Image.open(self.folder / row["file_name"]).convert("RGB")
        w, h = image.size
        scale = self.size / min(w, h)
        image = image.resize((round(w * scale), round(h * scale)), Image.BICUBIC)
        left, top = (image.width - self.size) // 2, (image.height - self.size) // 2
        image = image.crop((left, top, left + self.size, top + self.size))
        if self.rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        pixels = torch.from_numpy(np.asarray(image, np.float32)).permute(2, 0, 1) / 127.5 - 1
        text = "" if self.rng.random() < self.proportion_empty else row["text"]
        return pixels, text, torch.tensor([h, w, top, left, self.size, self.size], dtype=torch.float32)


class ReferenceTrainer:
    """One `step()` = one batch through the documented procedure; `save(folder)` writes a pipeline."""

    def __init__(self, model: str | Path, data: str | Path, batch: int = 16, lr: float = 1e-3, weight_decay: float = 1e-2,
                 lr_scheduler: str = "cosine", warmup: int = 100, max_iters: int = 1500, max_grad_norm: float = 1.0,
                 proportion_empty_prompts: float = 0.1, resolution: int = 64, seed: int = 0, device: str = "cpu"):
        from diffusers import EDMEulerScheduler, StableDiffusionXLPipeline
        from diffusers.optimization import get_scheduler

        torch.manual_seed(seed)
        self.pipe = StableDiffusionXLPipeline.from_pretrained(model).to(device)
        self.pipe.set_progress_bar_config(disable=True)
        self.unet = self.pipe.unet.train()
        self.scheduler = EDMEulerScheduler.from_config(self.pipe.scheduler.config)
        self.optimizer = torch.optim.AdamW(self.unet.parameters(), lr=lr, weight_decay=weight_decay)
        self.lr_scheduler = get_scheduler(lr_scheduler, self.optimizer, num_warmup_steps=warmup, num_training_steps=max_iters)
        self.max_grad_norm, self.device = max_grad_norm, device
        dataset = FolderDataset(Path(data), resolution, proportion_empty_prompts, seed)
        self.loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True,
                                                  generator=torch.Generator().manual_seed(seed))
        self.batches = iter(())
        vae = self.pipe.vae.config
        self.mean = torch.tensor(vae.latents_mean).view(1, -1, 1, 1).to(device) if vae.latents_mean else None
        self.std = torch.tensor(vae.latents_std).view(1, -1, 1, 1).to(device) if vae.latents_std else None
        self.sigmas = self.scheduler.sigmas.to(device)
        self.timesteps = self.scheduler.timesteps.to(device)
        self.losses: list[float] = []

    def _batch(self):
        try:
            return next(self.batches)
        except StopIteration:
            self.batches = iter(self.loader)
            return next(self.batches)

    def step(self) -> int:
        pixels, captions, time_ids = self._batch()
        with torch.no_grad():
            latents = self.pipe.vae.encode(pixels.to(self.device)).latent_dist.sample()
            if self.mean is not None:
                latents = (latents - self.mean) * self.pipe.vae.config.scaling_factor / self.std
            else:
                latents = latents * self.pipe.vae.config.scaling_factor
            prompt_embeds, _, pooled, _ = self.pipe.encode_prompt(list(captions), do_classifier_free_guidance=False)
        noise = torch.randn_like(latents)
        indices = torch.randint(0, self.scheduler.config.num_train_timesteps, (latents.shape[0],), device=self.device)
        timesteps = self.timesteps[indices]
        sigmas = self.sigmas[indices].view(-1, 1, 1, 1)
        noisy = latents + noise * sigmas
        pred = self.unet(self.scheduler.precondition_inputs(noisy, sigmas), timesteps, encoder_hidden_states=prompt_embeds,
                         added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids.to(self.device)}).sample
        pred = self.scheduler.precondition_outputs(noisy, pred, sigmas)
        loss = torch.nn.functional.mse_loss(pred.float(), latents.float(), reduction="mean")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.unet.parameters(), self.max_grad_norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.losses.append(loss.item())  # the scripts log it every step
        return len(pixels)

    def save(self, folder: str | Path) -> Path:
        self.unet.eval()
        self.pipe.save_pretrained(folder, safe_serialization=True)
        self.unet.train()
        return Path(folder)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="a diffusers Playground/SDXL pipeline folder")
    parser.add_argument("--data", required=True, help="an image folder with metadata.jsonl")
    parser.add_argument("--out", required=True)
    parser.add_argument("--iters", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    trainer = ReferenceTrainer(args.model, args.data, args.batch, args.lr, warmup=args.warmup, max_iters=args.iters,
                               resolution=args.resolution, seed=args.seed)
    start = time.perf_counter()
    for i in range(args.iters):
        trainer.step()
        if (i + 1) % 100 == 0:
            print(f"iter {i + 1}/{args.iters}  loss {np.mean(trainer.losses[-100:]):.4f}  "
                  f"{(i + 1) / (time.perf_counter() - start):.2f} it/s", flush=True)
    print(f"saved {trainer.save(args.out)}")


if __name__ == "__main__":
    main()
