"""validation.loss: the loss on held-out images at a fixed σ grid with fixed noise, logged per σ and overall, the same
after a resume, from pixels or from the latent cache, and every mistake one line before anything loads."""

import json
import logging
import shutil

import pytest
import torch

from conftest import tiny_cfg
from pgv25.engine.options import read_options
from pgv25.engine.runner import train
from pgv25.errors import UserError

LOSS = ("validation.loss.interval=2", "validation.loss.split=0.2", "validation.loss.max_images=12",
        "validation.loss.batch_size=5", "sample_grid.prompts=[]", "default_hooks.checkpoint.interval=2")


def tiny_assets_images(tiny_assets) -> list[str]:
    return (tiny_assets["shapes"] / "metadata.jsonl").read_text().splitlines()


def measurements(work) -> list[dict]:
    return [row for row in map(json.loads, (work / "scalars.jsonl").read_text().splitlines()) if "val_loss" in row]


@pytest.mark.slow
def test_measured_per_sigma_before_during_and_at_the_end_and_the_same_after_a_resume(tiny_assets, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="pgv25")
    straight = tmp_path / "straight"
    train(tiny_cfg(straight, "train_cfg.max_iters=5", *LOSS))
    rows = measurements(straight)
    assert [r["iteration"] for r in rows] == [0, 2, 4, 5]  # before the first iteration, every 2, and at the end
    sigma_keys = [k for k in rows[0] if k.startswith("val_loss/sigma_")]
    assert len(sigma_keys) == 8 and all(r["val_loss/images"] == 12 for r in rows)
    for row in rows:  # the overall number is the mean over the σ grid
        assert row["val_loss"] == pytest.approx(sum(row[k] for k in sigma_keys) / 8, rel=1e-12)
    assert rows[0]["val_loss"] != rows[-1]["val_loss"]  # training moved it
    assert (straight / "validation_loss.png").stat().st_size > 0
    # Resumed from iteration 2: the same measurements at 4 and 5, to the last bit (fixed images, σ and noise).
    resumed = tmp_path / "resumed"
    shutil.copytree(straight / "checkpoints" / "iter_0000002", resumed / "checkpoints" / "iter_0000002")
    train(tiny_cfg(resumed, "train_cfg.max_iters=5", *LOSS), resume=True)
    assert measurements(resumed) == [r for r in rows if r["iteration"] > 2]
    assert "validation loss: 12 held-out images; 8 σ from 0.02 to 80, every 2 iterations" in caplog.text


@pytest.mark.slow
def test_a_held_out_dataset_of_its_own_from_the_latent_cache(tiny_assets, tmp_path, caplog):
    """validation.loss.dataset: its own folder over the shared settings, cached like the training images; the training
    set keeps all of its images. Two fresh runs measure the same number at iteration 0: it moves only with the model."""
    held = tmp_path / "held"
    held.mkdir()
    lines = (tiny_assets["shapes"] / "metadata.jsonl").read_text().splitlines()[:6]
    for line in lines:
        shutil.copy(tiny_assets["shapes"] / json.loads(line)["file_name"], held / json.loads(line)["file_name"])
    (held / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    options = ("train_cfg.max_iters=2", "validation.loss.interval=2", "validation.loss.dataset.type=folder",
               f"validation.loss.dataset.path={held}", "train_dataloader.dataset.cache.enabled=True", "sample_grid.prompts=[]")
    first, second = tmp_path / "a", tmp_path / "b"
    caplog.set_level(logging.INFO, logger="pgv25")
    train(tiny_cfg(first, *options))
    train(tiny_cfg(second, *options))
    a, b = measurements(first), measurements(second)
    assert [r["iteration"] for r in a] == [0, 2] and a[0]["val_loss/images"] == 6
    assert a[0] == b[0] and torch.isfinite(torch.tensor(a[0]["val_loss"]))
    assert "latent cache of 6 images" in caplog.text  # built once, by the first run
    assert f"{len(tiny_assets_images(tiny_assets))} images in 1 bucket" in caplog.text  # the training set keeps all of its own


@pytest.mark.parametrize("change, message", [
    (["validation.loss.interval=2"], "needs held-out images: validation.loss.split"),
    (["validation.loss.interval=2", "validation.loss.split=1.5"], r"validation.loss.split must be a fraction in \[0, 1\)"),
    (["validation.loss.interval=2", "validation.loss.split=0.1", "validation.loss.sigmas=[0.5,-1]"], "positive noise levels"),
    (["validation.loss.interval=2", "validation.loss.split=0.1", "validation.loss.batch_size=0"], "batch_size must be a positive"),
    (["validation.loss.interval=2", "validation.loss.split=0.1", "train_dataloader.dataset.streaming=True"], "needs a scanned dataset"),
    (["validation.loss.interval=2", "validation.loss.split=0.1", "strategy=fsdp"], "with strategy='fsdp' is not supported yet"),
])
def test_mistakes_are_one_line_before_anything_loads(tmp_path, change, message):
    with pytest.raises(UserError, match=message) as error:
        read_options(tiny_cfg(tmp_path, *change))
    assert "\n" not in str(error.value)


def test_not_for_preference_pairs_yet(tmp_path):
    with pytest.raises(UserError, match="not measured for preference pairs yet"):
        read_options(tiny_cfg(tmp_path, "validation.loss.interval=2", "validation.loss.split=0.1",
                              config="playgroundv2_5_dpo_tiny_shapes"))


@pytest.mark.slow
def test_dreambooth_measures_its_class_images_as_a_curve_of_their_own(tiny_assets, tmp_path):
    """With prior preservation, the class images the base model drew get their own curve (val_loss_class): the drift
    prior preservation holds back. They are measured, not held out: they stay in every batch's class half."""
    instance, class_dir = tmp_path / "instance", tmp_path / "class"
    work = tmp_path / "run"
    train(tiny_cfg(work, f"objective.class_data_dir={class_dir}", "objective.num_class_images=4",
                   "objective.class_generation.steps=2", "objective.class_generation.batch_size=2",
                   f"train_dataloader.dataset.path={instance}", f"tiny_dreambooth.folder={instance}", "tiny_dreambooth.count=2",
                   "train_dataloader.batch_size=2", "sample_grid.prompts=[]", "train_cfg.max_iters=2",
                   "validation.loss.interval=2", config="playgroundv2_5_dreambooth_lora_tiny_shapes"))
    rows = measurements_of(work, "val_loss_class")
    assert [r["iteration"] for r in rows] == [0, 2] and rows[0]["val_loss_class/images"] == 4
    assert len([k for k in rows[0] if k.startswith("val_loss_class/sigma_")]) == 8
    assert not any("val_loss" in r for r in rows)  # no held-out instance images asked for: no instance curve
    assert rows[0]["val_loss_class"] != rows[1]["val_loss_class"] and (work / "validation_loss.png").is_file()


def measurements_of(work, name: str) -> list[dict]:
    return [row for row in map(json.loads, (work / "scalars.jsonl").read_text().splitlines()) if name in row]
