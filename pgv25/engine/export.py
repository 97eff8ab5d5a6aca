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

from safetensors.torch import save_file

from ..errors import UserError
from ..files import DTYPES
from .integrity import finish_folder
from .model_card import write_card

FROZEN = ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2", "vae", "scheduler")


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


def single_file_name(out_dir: Path) -> str:
    """`<config>-step<N>.safetensors`: a name that still says what it is in ComfyUI's checkpoint folder."""
    return f"{out_dir.parent.name}-{out_dir.name}.safetensors"


def export_pipeline(unet, base_folder: str | Path, out_dir: Path, dtype: str = "fp32", state: dict | None = None,
                    scheduler=None, single_file: dict | None = None, text_encoders: dict | None = None,
                    card: dict | None = None) -> Path:
    """Write `out_dir` as a diffusers pipeline: the base pipeline's frozen parts + this UNet.

    `scheduler`: a diffusers scheduler to ship instead of the base's (a model trained on another noise
    schedule must be sampled on it); model_index.json then names its class. `single_file`: also the
    whole pipeline as one LDM-layout file inside the folder (single_file.py; keys dtype, run).
    `text_encoders`: name → encoder to save instead of linking the base's (a fused text-encoder LoRA).
    `card`: the model card (`card`, sample `images`) to write as README.md (model_card.py).
    """
    base_folder = Path(base_folder)
    text_encoders = text_encoders or {}
    with atomic_folder(out_dir) as tmp:
        frozen = FROZEN if scheduler is None else tuple(n for n in FROZEN if n != "scheduler")
        for name, encoder in text_encoders.items():
            encoder.save_pretrained(tmp / name)
        for name in (n for n in frozen if n not in text_encoders):
            _link_tree(base_folder / name, tmp / name)
        if scheduler is None:
            _link_or_copy(base_folder / "model_index.json", tmp / "model_index.json")
        else:
            scheduler.save_pretrained(tmp / "scheduler")
            index = json.loads((base_folder / "model_index.json").read_text())
            index["scheduler"] = ["diffusers", type(scheduler).__name__]
            (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
        save_unet(unet, tmp / "unet", dtype, state)
        if card is not None:
            write_card(tmp, card["card"], card.get("images"))
        if single_file is not None:  # inside the folder: the manifest covers it, the rename publishes both at once
            from .single_file import write_single_file

            write_single_file(tmp, tmp / single_file_name(out_dir), single_file.get("dtype", "fp16"),
                              title=f"{out_dir.parent.name} {out_dir.name}", run=single_file.get("run"))
    return out_dir


def fuse_lora_pipeline(base_folder: str | Path, lora_path: str | Path, out_dir: Path, scale: float = 1.0,
                       dtype: str = "fp32") -> Path:
    """`out_dir`: the base pipeline with the LoRA folded into its weights (diffusers' own fuse_lora), any layout
    diffusers reads (pgv25/diffusers, kohya); text encoders are written only when the LoRA touches them."""
    from diffusers import StableDiffusionXLPipeline

    from ..models.lora_files import component, read_lora, resolve
    from .single_file import check_pipeline_folder

    base_folder, lora_path, out_dir = Path(base_folder), resolve(lora_path), Path(out_dir)
    check_pipeline_folder(base_folder)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise UserError(f"{out_dir} exists and is not empty; choose a new folder for the fused pipeline")
    lora = read_lora(lora_path)
    if lora.dora and lora.layout == "kohya":
        raise UserError(f"{lora_path}: diffusers drops DoRA magnitudes from kohya files; fuse the diffusers-format file")
    parts = sorted({component(name) for name in lora.layers})
    pipe = StableDiffusionXLPipeline.from_pretrained(base_folder)
    try:
        pipe.load_lora_weights(str(lora_path.parent), weight_name=lora_path.name)
    except (RuntimeError, ValueError, KeyError) as error:  # shapes or names of another base model
        raise UserError(f"{lora_path} does not fit the model in {base_folder}: {str(error).strip().splitlines()[0][:300]}") from None
    pipe.fuse_lora(components=parts, lora_scale=scale)
    pipe.unload_lora_weights()
    encoders = {name: getattr(pipe, name) for name in parts if name != "unet"}
    return export_pipeline(pipe.unet, base_folder, out_dir, dtype, text_encoders=encoders)
