"""Validation grids: made before the first iteration and every N, logged, and invisible to the training RNG."""

import json

import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import tiny_cfg
from pgv25.engine.runner import train

OPTIONS = ["validation.prompts=[a red circle on a white background,a blue square on a black background]", "train_cfg.max_iters=4", "default_hooks.checkpoint.interval=4", "sample_grid.prompts=[]", "ema.enabled=True",
           "ema.warmup=False", "ema.decay=0.5"]


def losses(work):
    return [json.loads(line)["loss"] for line in (work / "scalars.jsonl").read_text().splitlines()]


def test_validation_grids_do_not_change_training(tiny_assets, tmp_path):
    with_grids = train(tiny_cfg(tmp_path / "a", *OPTIONS, "validation.interval=2"))
    without = train(tiny_cfg(tmp_path / "b", *OPTIONS))
    grids = sorted(p.name for p in (tmp_path / "a" / "validation").glob("*.png"))
    assert grids == ["iter_0000000.png", "iter_0000002.png", "iter_0000004.png"]
    assert not (tmp_path / "b" / "validation").exists()
    # the same losses and weights to the last bit: sampling drew nothing from the training RNG
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    a = load_file(with_grids.step_dir / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(without.step_dir / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # with EMA: an EMA row and a raw row, one column per prompt
    grid = Image.open(tmp_path / "a" / "validation" / "iter_0000004.png")
    assert grid.size == (2 * 192, 2 * (192 + 28))
    first, last = (Image.open(tmp_path / "a" / "validation" / f"iter_000000{i}.png") for i in (0, 4))
    assert first.tobytes() != last.tobytes()


def test_validation_grid_is_in_tensorboard(tiny_assets, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator

    train(tiny_cfg(tmp_path, *OPTIONS, "validation.interval=4", "ema.enabled=False"))
    events = EventAccumulator(str(next((tmp_path / "tensorboard").rglob("events.out.tfevents.*")).parent), size_guidance={IMAGES: 0})
    events.Reload()
    assert [e.step for e in events.Images("validation")] == [0, 4]
