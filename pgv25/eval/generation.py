"""`pgv25 eval generate`: one image per prompt from an export, laid out as MJHQ-30K lays out its reference images
(`<out>/<category>/<id>.png`), for FID and CLIP score.

Generating 30,000 images at 1024² takes GPU-hours, so a run is sharded and resumable:
- each process (`NPROC_PER_NODE`) makes every world_size-th prompt's image;
- each image has a seed of its own, from `--seed` and the prompt's id, so it is the same image whatever the process
  count, the order, a `--per-category` subset or a rerun;
- each image is written under a temporary name and renamed, so an image that exists is complete, and a rerun
  (after a kill -9, or on more prompts) makes only the missing ones;
- the settings are recorded in `generation.json`; a rerun with other settings is refused, not mixed in.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch

from ..errors import UserError
from ..files import atomic_file
from .prompts import EvalPrompt

logger = logging.getLogger("pgv25")
SETTINGS = "generation.json"  # how every image of the folder was made
META = "meta_data.json"  # {id: {category, prompt, seed}}: MJHQ-30K's layout, read back by FID and CLIP score


def image_path(out: Path, prompt: EvalPrompt) -> Path:
    return out / prompt.category / f"{prompt.id}.png" if prompt.category else out / f"{prompt.id}.png"


def prompt_seed(seed: int, image_id: str) -> int:
    """The image's own seed: the same for an id whatever else is generated beside it."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{image_id}".encode()).digest()[:8], "little") & (2**63 - 1)


def record_settings(out: Path, settings: dict, prompts: list[EvalPrompt], seed: int, write: bool = True) -> None:
    """`generation.json` (a rerun with other settings is refused, on every process) and `meta_data.json` (`write`:
    rank 0 only)."""
    out.mkdir(parents=True, exist_ok=True)
    recorded = out / SETTINGS
    if recorded.is_file():
        before = json.loads(recorded.read_text())
        changed = sorted(k for k in set(before) | set(settings) if before.get(k) != settings.get(k))
        if changed:
            said = ", ".join(f"{k}: {before.get(k)!r} -> {settings.get(k)!r}" for k in changed)
            raise UserError(f"{out} holds images made with other settings ({said}); give a new --out, or the same "
                            "settings to add the missing images")
    if not write:
        return
    if not recorded.is_file():
        with atomic_file(recorded) as tmp:
            tmp.write_text(json.dumps(settings, indent=2))
    meta_path = out / META
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    meta.update({p.id: {"category": p.category, "prompt": p.prompt, "seed": prompt_seed(seed, p.id)} for p in prompts})
    with atomic_file(meta_path) as tmp:
        tmp.write_text(json.dumps(meta, indent=1, ensure_ascii=False))


def generate_images(pipe, prompts: list[EvalPrompt], out: Path, seed: int = 0, steps: int = 50, guidance_scale: float = 3.0,
                    negative_prompt: str | None = None, width: int | None = None, height: int | None = None,
                    rank: int = 0, world_size: int = 1, progress: bool = True, batch_size: int = 1) -> dict:
    """This process's share of the missing images; returns the counts (asked, this process's, made, already there).

    `batch_size` prompts go through the pipeline at once, each with its own seeded generator: an image's noise is
    its own at any batch size (the pixels agree up to the batched kernels' rounding), so a set can be resumed with
    another batch size. Each image is written as soon as its batch is done."""
    from tqdm import tqdm

    from ..models.speed import attention_backend

    mine = prompts[rank::world_size]
    todo = [p for p in mine if not image_path(out, p).is_file()]
    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), unit="img", disable=not progress or rank != 0,
               desc=f"generating ({world_size} process{'es' if world_size > 1 else ''}; rank 0's share)")
    with bar, attention_backend(getattr(pipe, "_pgv25_attention", None)):
        for first in range(0, len(todo), batch_size):
            batch = todo[first : first + batch_size]
            images = pipe([p.prompt for p in batch], negative_prompt=[negative_prompt] * len(batch) if negative_prompt else None,
                          num_inference_steps=steps, guidance_scale=guidance_scale, width=width, height=height,
                          generator=[torch.Generator("cpu").manual_seed(prompt_seed(seed, p.id)) for p in batch]).images
            for prompt, image in zip(batch, images):
                path = image_path(out, prompt)
                path.parent.mkdir(parents=True, exist_ok=True)
                for stale in path.parent.glob(f".{path.name}.tmp*"):  # left by a process killed mid-write
                    stale.unlink(missing_ok=True)
                with atomic_file(path) as tmp:
                    image.save(tmp, format="PNG")
                bar.update(1)
    return {"asked": len(prompts), "mine": len(mine), "made": len(todo), "present": len(mine) - len(todo)}


def world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment (1 process without it); no process group is needed:
    the processes write disjoint files."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))
