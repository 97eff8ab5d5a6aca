"""Masked loss through `pgv25 train`: white masks train exactly as no masks; real masks train from pixels and from the
latent cache, which stores the weights at the latent's size."""

import pytest
import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from conftest import tiny_cfg
from pgv25.engine.runner import train


def masked_copy(shapes, root, n=8, value=None):
    """n shapes images with their metadata and a mask beside each: all `value`, or the left half white."""
    root.mkdir()
    rows = [json.loads(line) for line in (shapes / "metadata.jsonl").read_text().splitlines()][:n]
    for row in rows:
        shutil.copy(shapes / row["file_name"], root / row["file_name"])
        size = Image.open(root / row["file_name"]).size
        mask = np.full((size[1], size[0]), 0 if value is None else value, np.uint8)
        if value is None:
            mask[:, : size[0] // 2] = 255
        Image.fromarray(mask, "L").save(root / row["file_name"].replace(".png", "_mask.png"))
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def losses(work):
    return [json.loads(line)["loss"] for line in (work / "scalars.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_white_masks_change_nothing_and_real_masks_train_with_and_without_cache(tiny_assets, tmp_path):
    white = masked_copy(tiny_assets["shapes"], tmp_path / "white", value=255)
    common = ["train_cfg.max_iters=3", "sample_grid.prompts=[]", f"train_dataloader.dataset.path={white}"]
    train(tiny_cfg(tmp_path / "plain", *common))
    train(tiny_cfg(tmp_path / "white_masks", *common, "train_dataloader.dataset.mask.source=file"))
    assert losses(tmp_path / "white_masks") == losses(tmp_path / "plain")  # weights of exactly 1: the same steps

    half = masked_copy(tiny_assets["shapes"], tmp_path / "half")
    masked = [*common, f"train_dataloader.dataset.path={half}", "train_dataloader.dataset.mask.source=file",
              "train_dataloader.dataset.mask.unmasked_weight=0.1"]
    train(tiny_cfg(tmp_path / "half_masks", *masked))
    first = losses(tmp_path / "half_masks")
    assert all(np.isfinite(first)) and first != losses(tmp_path / "plain")
    train(tiny_cfg(tmp_path / "cached", *masked, "train_dataloader.dataset.cache.enabled=True"))
    assert all(np.isfinite(losses(tmp_path / "cached")))
    from safetensors import safe_open

    # the cache of this data: the one whose latents carry loss weights (other tests build caches of their own)
    folders = (Path(tiny_cfg(tmp_path / "cached", *masked).train_dataloader.dataset.cache_dir) / "latents").glob("*/latents-r0-*")
    stored = [safe_open(str(f), "pt") for f in folders]
    stored = [f for f in stored if any(k.endswith(".loss_weights") for k in f.keys())]
    assert len(stored) == 1
    keys = sorted(stored[0].keys())
    weights = stored[0].get_tensor(next(k for k in keys if k.endswith(".loss_weights")))
    latents = stored[0].get_tensor(next(k for k in keys if "." not in k))
    assert weights.shape[-2:] == latents.shape[-2:] and weights.shape[:2] == (2, 1)  # both flips, one channel
    assert abs(float(weights.float().mean()) - (0.5 + 0.5 * 0.1)) < 0.02  # half white, half 0.1
