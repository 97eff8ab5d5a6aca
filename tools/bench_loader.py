"""Data-loader throughput at 1024² with aspect-ratio buckets: JPEG and PNG folders, and the latent cache.

    python tools/bench_loader.py                      # 2 workers, 96 images per format
    python tools/bench_loader.py --workers 0 1 2 --images 64 --json out.json

Writes photo-like images (smooth colour fields plus fine texture, so they compress like photos)
at typical camera and web sizes and aspect ratios, then times the real pgv25 path: scan →
buckets → BucketBatchSampler → BucketedImageDataset (decode, EXIF, resize-to-cover, crop, flip)
→ DataLoader. The cache row reads the real cache format at full size (latents 4×h/8×w/8 and
77×2048 caption embeddings, fp16); its tensors are written by the real `build_cache` with
stand-in encoders that return the right shapes, since reading speed does not depend on values.
A GPU step consuming R images/s needs ceil(R / per-worker rate) workers.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pgv25.data.cache import CachedLatentDataset, build_cache  # noqa: E402
from pgv25.data.dataset import build_dataset, collate, plan_data  # noqa: E402
from pgv25.data.sampler import BucketBatchSampler  # noqa: E402

SIZES = [(1536, 1024), (1024, 1536), (2048, 2048), (1920, 1080), (1080, 1920), (1280, 1280), (2400, 1200), (1024, 768)]


def photo(size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    w, h = size
    base = Image.fromarray(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    texture = rng.normal(0, 12, (h, w, 1))
    return Image.fromarray(np.clip(np.asarray(base, np.float32) + texture, 0, 255).astype(np.uint8))


def write_images(folder: Path, count: int, fmt: str, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(count):
        name = f"{i:05d}.{'jpg' if fmt == 'jpeg' else 'png'}"
        image = photo(SIZES[i % len(SIZES)], rng)
        image.save(folder / name, **({"quality": 90} if fmt == "jpeg" else {"compress_level": 6}))
        rows.append({"file_name": name, "text": f"a photo number {i}"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def data_cfg(folder: Path, cache_dir: Path) -> dict:
    return {"type": "folder", "path": str(folder), "resolution": 1024, "buckets": {"step": 64, "weighting": 0.5},
            "random_flip": True, "cache_dir": str(cache_dir), "cache": {"enabled": True, "dtype": "fp16"}}


def rate(dataset, plan, batch_size: int, workers: int, batches: int) -> float:
    """Images per second from the loader, after its first batch (worker start-up excluded)."""
    sampler = BucketBatchSampler(plan.bucket_of, batch_size, plan.weighting, seed=0)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=workers, collate_fn=collate,
                                         persistent_workers=False, prefetch_factor=4 if workers else None)
    iterator = iter(loader)
    next(iterator)
    start, images = time.perf_counter(), 0
    for _ in range(batches):
        images += next(iterator)["size"]
    return images / (time.perf_counter() - start)


class StandInCodec:
    """The shapes of the SDXL VAE's normalised latents (4 channels, 1/8 size)."""

    def encode_mean(self, pixels: torch.Tensor) -> torch.Tensor:
        b, _, h, w = pixels.shape
        return torch.randn(b, 4, h // 8, w // 8)


class StandInConditioner:
    """The shapes of Playground's prompt embeddings (77 × 768+1280) and pooled (1280)."""

    force_zeros_for_empty_prompt = True

    def encode(self, prompts: list[str]):
        return torch.randn(len(prompts), 77, 2048), torch.randn(len(prompts), 1280)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=96, help="images per format")
    parser.add_argument("--workers", type=int, nargs="+", default=[2])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--batches", type=int, default=20, help="timed batches per measurement")
    parser.add_argument("--gpu-rate", type=float, default=20.0, help="images/s a GPU consumes")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for fmt in ("jpeg", "png"):
            folder = write_images(tmp / fmt, args.images, fmt)
            cfg = data_cfg(folder, tmp / "cache")
            start = time.perf_counter()
            plan = plan_data(cfg, args.batch)
            scan_s = time.perf_counter() - start
            dataset = build_dataset(cfg, plan, seed=0)
            for workers in args.workers:
                r = rate(dataset, plan, args.batch, workers, args.batches)
                results.append({"source": fmt, "workers": workers, "images_per_s": r, "scan_images_per_s": len(plan.index) / scan_s})
                print(f"{fmt:5s} {workers} worker(s): {r:7.1f} images/s   (scan {len(plan.index) / scan_s:.0f} images/s)", flush=True)
            if fmt == "jpeg":
                cache = tmp / "cache" / "latents" / "bench"
                build_cache(plan, cfg, cache, StandInCodec(), StandInConditioner(), seed=0, device="cpu")
                cached = CachedLatentDataset(cache, plan, caption_dropout=0.05, seed=0)
                for workers in args.workers:
                    r = rate(cached, plan, args.batch, workers, args.batches * 5)
                    results.append({"source": "cache", "workers": workers, "images_per_s": r})
                    print(f"cache {workers} worker(s): {r:7.1f} samples/s", flush=True)
    for row in results:
        per_worker = row["images_per_s"] / max(1, row["workers"])
        row["workers_for_gpu_rate"] = math.ceil(args.gpu_rate / per_worker)
    print(f"\nworkers needed to feed {args.gpu_rate:g} images/s:")
    for row in results:
        print(f"  {row['source']:5s} (measured with {row['workers']}): {row['workers_for_gpu_rate']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
