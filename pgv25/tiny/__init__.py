"""The embedded default's assets: the shapes dataset and the tiny base pipeline, built once and cached.

A stamp file records the parameters they were built with; a different request rebuilds them, the
same one returns at once. Each is built in a temporary folder and renamed into place, so an
interrupted build never leaves a half-written cache that a later run would trust.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from ..engine.integrity import share_permissions
from .base_pipeline import build_base_pipeline
from .shapes import write_open_dataset, write_shapes_dataset, write_shapes_pairs

logger = logging.getLogger(__name__)
ASSETS_VERSION = 2  # bump when the builders change what they write
STAMP = "pgv25_assets.json"


def _read_stamp(folder: Path) -> dict | None:
    try:
        return json.loads((folder / STAMP).read_text())
    except (OSError, ValueError):
        return None


def _build_atomically(target: Path, params: dict, build, what: str) -> dict:
    stamp = _read_stamp(target)
    if stamp is not None and stamp.get("params") == params:
        return stamp
    from ..engine.locks import building

    with building(target, what):  # another run may be building it, maybe with other parameters
        return _build_locked(target, params, build, what)


def _build_locked(target: Path, params: dict, build, what: str) -> dict:
    stamp = _read_stamp(target)
    if stamp is not None and stamp.get("params") == params:  # built by the run we waited for
        return stamp
    logger.info("building %s in %s", what, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        facts = build(tmp) or {}
        stamp = {"params": params, **facts}
        (tmp / STAMP).write_text(json.dumps(stamp, indent=2))
        share_permissions(tmp)  # mkdtemp's folder is owner-only, and so are safetensors' files
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return stamp


def ensure_tiny_assets(root: str | Path, image_size: int = 64, per_caption: int = 8, vae_steps: int = 800, seed: int = 0,
                       hold_out: bool = True, extra_datasets: dict | None = None, text_steps: int = 300,
                       spread: float = 1.0) -> dict:
    """Make sure `root/shapes` and `root/playground-v2.5-tiny` exist for these parameters.

    `text_steps`: pre-training steps of the tiny text encoders (base_pipeline.pretrain_text_encoders).
    `hold_out`: leave `shapes.HELD_OUT` out of the training images (asked for at evaluation).
    `spread`: how much of the shape size and position ranges the images use (`shapes.draw`).
    `extra_datasets`: {folder name: dict(per_caption=, aspects={'1:1': share, '2:1': ..., '1:2': ...}, spread=)},
    more shapes datasets under `root` (e.g. mixed aspect ratios) for the same tiny pipeline; with `pairs=True`
    preference pairs instead (`shapes.write_shapes_pairs`: right vs wrong in one attribute, for DPO); with
    `open_backgrounds=[...]` captions that leave the background open, drawn evenly on each of those backgrounds
    (`shapes.write_open_dataset`: the toy where preference alignment has a choice to move).
    Returns the pipeline's stamp (it holds the VAE's PSNR and the measured latents_mean/std).
    """
    root = Path(os.path.expanduser(str(root)))
    data_params = {"version": ASSETS_VERSION, "image_size": image_size, "per_caption": per_caption, "seed": seed,
                   "hold_out": bool(hold_out), "spread": float(spread)}
    shapes = root / "shapes"
    _build_atomically(
        shapes, data_params, lambda d: {"images": write_shapes_dataset(d, image_size, per_caption, seed, hold_out, spread=spread)},
        "the shapes dataset",
    )
    for name, options in (extra_datasets or {}).items():
        options = dict(options)
        params = {**data_params, "per_caption": int(options.get("per_caption", per_caption)),
                  "aspects": dict(options.get("aspects") or {"1:1": 1.0}), "spread": float(options.get("spread", spread))}
        if options.get("pairs"):
            params["pairs"] = True
            what, build = f"the shape preference pairs {name}", lambda d, p=params: {
                "pairs": write_shapes_pairs(d, image_size, p["per_caption"], seed, hold_out, p["spread"])}
        elif options.get("open_backgrounds"):
            params["open_backgrounds"] = list(options["open_backgrounds"])
            what, build = f"the open-background shapes {name}", lambda d, p=params: {
                "images": write_open_dataset(d, image_size, p["per_caption"], seed, p["spread"], tuple(p["open_backgrounds"]))}
        else:
            what, build = f"the shapes dataset {name}", lambda d, p=params: {
                "images": write_shapes_dataset(d, image_size, p["per_caption"], seed, hold_out, p["aspects"], p["spread"])}
        _build_atomically(root / name, params, build, what)
    model_params = {**data_params, "vae_steps": vae_steps, "text_steps": text_steps}
    model = root / "playground-v2.5-tiny"
    stamp = _build_atomically(
        model, model_params, lambda d: build_base_pipeline(d, shapes, image_size, vae_steps, seed, text_steps),
        f"the tiny Playground v2.5 base pipeline (VAE: {vae_steps} steps)",
    )
    logger.info("tiny base pipeline ready: VAE reconstruction PSNR %.2f dB", stamp["vae_psnr_db"])
    return stamp
