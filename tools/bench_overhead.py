"""pgv25's per-iteration overhead against a minimal reference loop, on the tiny config (CPU or GPU).

    PGV25_CACHE=/tmp/pgv25 python tools/bench_overhead.py --iters 40 --rounds 3

Both sides do the same work per iteration from the same tiny base pipeline and the same image
folder, batch 16 at 64²: read and augment the images, encode them with the VAE and the captions
with both text encoders, one EDM training step of the UNet (Karras-index σ, x0 target), AdamW.
- pgv25: `Trainer.step()` of `pgv25 train playgroundv2_5_tiny_shapes` (its loader, sampler, caption
  dropout, micro-conditioning, σ-binned loss, non-finite guard), after construction.
- reference: a plain loop in the style of diffusers' training examples: a torch Dataset (PIL
  resize + centre crop + flip), `pipe.encode_prompt`, `vae.encode(...).latent_dist.sample()` with
  Playground's latent normalisation, and bench_train.py's ReferenceStep.
Rounds alternate; the overhead is reference images/s ÷ pgv25 images/s − 1 (medians over rounds).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_train import ReferenceStep  # noqa: E402

from pgv25.config import load_config, parse_cfg_options  # noqa: E402


class FolderDataset(torch.utils.data.Dataset):
    def __init__(self, folder: Path, size: int):
        self.rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
        self.folder, self.size = folder, size

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
        if random.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        pixels = torch.from_numpy(np.asarray(image, np.float32)).permute(2, 0, 1) / 127.5 - 1
        return pixels, row["text"], torch.tensor([h, w, top, left, self.size, self.size], dtype=torch.float32)


class ReferenceLoop:
    def __init__(self, folder: Path, model: Path, batch: int, lr: float, device: str):
        from diffusers import StableDiffusionXLPipeline

        self.pipe = StableDiffusionXLPipeline.from_pretrained(model).to(device)
        self.pipe.set_progress_bar_config(disable=True)
        unet = self.pipe.unet.train()
        self.step = ReferenceStep(unet, "AdamW", device, lambda: torch.autocast(device, enabled=False))
        for group in self.step.optimizer.param_groups:
            group["lr"] = lr
        self.loader = torch.utils.data.DataLoader(FolderDataset(folder, 64), batch_size=batch, shuffle=True, drop_last=True)
        self.batches = iter(())
        vae = self.pipe.vae.config
        self.mean = torch.tensor(vae.latents_mean).view(1, -1, 1, 1) if vae.latents_mean else None
        self.std = torch.tensor(vae.latents_std).view(1, -1, 1, 1) if vae.latents_std else None
        self.device = device

    def __call__(self) -> int:
        try:
            pixels, captions, time_ids = next(self.batches)
        except StopIteration:
            self.batches = iter(self.loader)
            pixels, captions, time_ids = next(self.batches)
        with torch.no_grad():
            latents = self.pipe.vae.encode(pixels.to(self.device)).latent_dist.sample()
            if self.mean is not None:
                latents = (latents - self.mean) * self.pipe.vae.config.scaling_factor / self.std
            prompt_embeds, _, pooled, _ = self.pipe.encode_prompt(list(captions), do_classifier_free_guidance=False)
        self.step({"latents": latents, "prompt_embeds": prompt_embeds, "pooled": pooled, "time_ids": time_ids.to(self.device)})
        return len(pixels)


def rate(step, iters: int) -> float:
    step()  # warm-up
    images, start = 0, time.perf_counter()
    for _ in range(iters):
        images += step()
    return images / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iters", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--work-dir", default="work_dirs/bench_overhead")
    parser.add_argument("--cfg-options", nargs="+", default=[])
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    from pgv25.engine.runner import Trainer

    cfg = load_config("playgroundv2_5_tiny_shapes", parse_cfg_options([
        f"train_dataloader.batch_size={args.batch}", "validation.interval=0", "default_hooks.logger.interval=100000",
        *args.cfg_options]))
    cfg.work_dir = args.work_dir
    trainer = Trainer(cfg)  # builds the tiny assets if needed

    def pgv25_step() -> int:
        return trainer.step().images

    reference = ReferenceLoop(Path(cfg.train_dataloader.dataset.path), Path(cfg.model.pretrained_model_name_or_path),
                              args.batch, float(cfg.optim_wrapper.optimizer.lr), str(trainer.device))
    rates = {"pgv25": [], "reference": []}
    for _ in range(args.rounds):
        rates["pgv25"].append(rate(pgv25_step, args.iters))
        rates["reference"].append(rate(reference, args.iters))
        print(f"pgv25 {rates['pgv25'][-1]:.1f} images/s   reference {rates['reference'][-1]:.1f} images/s", flush=True)
    ours, ref = statistics.median(rates["pgv25"]), statistics.median(rates["reference"])
    result = {"pgv25_images_per_s": ours, "reference_images_per_s": ref, "overhead": ref / ours - 1, "rounds": rates,
              "threads": torch.get_num_threads(), "batch": args.batch, "iters": args.iters}
    print(f"overhead of pgv25 vs the reference loop: {result['overhead']:+.1%} (medians of {args.rounds} rounds)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
