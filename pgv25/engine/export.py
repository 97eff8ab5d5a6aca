"""Export a trained UNet as a complete diffusers pipeline folder: `work_dir/step<N>/`.

The frozen parts (tokenizers, text encoders, VAE, scheduler, model_index.json) are hard-linked
(or copied, across file systems) from the base pipeline folder byte for byte, so an export never
changes them, even when training kept them in bf16. Only `unet/` is written. The folder is
assembled under a temporary name and renamed, so a `step<N>` that exists is complete; its manifest
(integrity.py) shows later damage.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import UserError
from .integrity import finish_folder

FROZEN = ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2", "vae", "scheduler")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _link_or_copy(src: Path, dst: Path) -> None:
    src = src.resolve()  # hub snapshots are symlinks into the blob store
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _link_tree(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        if item.is_dir():
            _link_tree(item, dst / item.name)
        else:
            _link_or_copy(item, dst / item.name)


def save_unet(unet, folder: Path, dtype: str = "fp32", state: dict | None = None) -> None:
    """`config.json` + `diffusion_pytorch_model.safetensors`, the layout `from_pretrained` reads.

    `state`: the full weights when `unet` itself holds only a shard of them (FSDP).
    """
    if dtype not in DTYPES:
        raise UserError(f"export.dtype must be one of {', '.join(DTYPES)}, got '{dtype}'")
    folder.mkdir(parents=True, exist_ok=True)
    unet.save_config(folder)
    state = unet.state_dict() if state is None else state
    state = {k: v.detach().to("cpu", DTYPES[dtype]).contiguous() for k, v in state.items()}
    save_file(state, folder / "diffusion_pytorch_model.safetensors", metadata={"format": "pt"})


@contextlib.contextmanager
def atomic_folder(out_dir: Path):
    """Yield a temporary folder that replaces `out_dir` once the block succeeds; on an OSError,
    a one-line UserError and `out_dir` (an earlier export) untouched."""
    tmp = out_dir.parent / f".{out_dir.name}.tmp{os.getpid()}"
    for stale in out_dir.parent.glob(f".{out_dir.name}.tmp*"):  # left by a run killed mid-export
        shutil.rmtree(stale, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        yield tmp
        finish_folder(tmp)  # ordinary permissions, and the manifest `pgv25 ckpt verify` checks
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except OSError as error:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"cannot write export {out_dir}: {error.strerror or error}; earlier exports are intact") from None


def export_pipeline(unet, base_folder: str | Path, out_dir: Path, dtype: str = "fp32", state: dict | None = None,
                    scheduler=None) -> Path:
    """Write `out_dir` as a diffusers pipeline: the base pipeline's frozen parts + this UNet.

    `scheduler`: a diffusers scheduler to ship instead of the base's (a model trained on another noise
    schedule must be sampled on it); model_index.json then names its class.
    """
    base_folder = Path(base_folder)
    with atomic_folder(out_dir) as tmp:
        frozen = FROZEN if scheduler is None else tuple(n for n in FROZEN if n != "scheduler")
        for name in frozen:
            _link_tree(base_folder / name, tmp / name)
        if scheduler is None:
            _link_or_copy(base_folder / "model_index.json", tmp / "model_index.json")
        else:
            scheduler.save_pretrained(tmp / "scheduler")
            index = json.loads((base_folder / "model_index.json").read_text())
            index["scheduler"] = ["diffusers", type(scheduler).__name__]
            (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
        save_unet(unet, tmp / "unet", dtype, state)
    return out_dir
