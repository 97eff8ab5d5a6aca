"""DreamBooth with prior preservation on the tiny default: class images drawn once by the base pipeline, every
batch half instance and half class images of one bucket, both losses logged, exact resume; mistakes in one line."""

import json
import logging
import shutil

import pytest

from conftest import TINY_OPTIONS, tiny_cfg
from pgv25.engine.runner import train
from pgv25.errors import UserError


def scalars(work):
    return [json.loads(line) for line in (work / "scalars.jsonl").read_text().splitlines()]


@pytest.fixture()
def instance_dir(tiny_assets, tmp_path):
    return tmp_path / "instance"  # the config's tiny_dreambooth hook copies its images there


DREAMBOOTH = "playgroundv2_5_dreambooth_lora_tiny_shapes"


def prior_options(instance, class_dir, *more):
    return [f"objective.class_data_dir={class_dir}", "objective.num_class_images=4", "objective.prior_loss_weight=0.5",
            "objective.class_generation.steps=2", "objective.class_generation.batch_size=2",
            f"train_dataloader.dataset.path={instance}", f"tiny_dreambooth.folder={instance}", "tiny_dreambooth.count=2",
            "train_dataloader.batch_size=2", "sample_grid.prompts=[]", *more]


def dreambooth_cfg(work, *options):
    return tiny_cfg(work, *options, config=DREAMBOOTH)


@pytest.mark.slow
def test_prior_preservation_trains_both_halves_and_resumes_exactly(instance_dir, tmp_path, caplog):
    class_dir = tmp_path / "class"
    options = prior_options(instance_dir, class_dir, "train_cfg.max_iters=4", "default_hooks.checkpoint.interval=2",
                            "train_dataloader.dataset.cache.enabled=True")  # class images in the latent cache too
    with caplog.at_level(logging.INFO, logger="pgv25"):
        train(dreambooth_cfg(tmp_path / "straight", *options))
    assert sorted(p.name for p in class_dir.iterdir()) == [f"class_{i:05d}.png" for i in range(4)]
    assert any("prior preservation: 2 instance and 4 class images" in r.message for r in caplog.records)
    rows = scalars(tmp_path / "straight")
    assert all(r["loss_instance"] > 0 and r["loss_prior"] > 0 for r in rows)  # every step saw both kinds
    # the step's loss is mean_instance + 0.5 · mean_class (each step logged alone)
    assert all(abs(r["loss"] - (r["loss_instance"] + 0.5 * r["loss_prior"])) < 1e-5 * r["loss"] for r in rows)

    caplog.clear()
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "straight" / "checkpoints" / "iter_0000002", resumed / "checkpoints" / "iter_0000002")
    with caplog.at_level(logging.INFO, logger="pgv25"):
        train(dreambooth_cfg(resumed, *options), resume=True)
    assert any("class images: 4 in" in r.message and "none to generate" in r.message for r in caplog.records)  # reused
    assert [r["loss"] for r in scalars(resumed)] == [r["loss"] for r in rows[2:]]


@pytest.mark.parametrize("change, message", [
    (["objective.type=denoising"], "objective.class_data_dir is read only with objective.type='prior_preservation'"),
    (["objective.class_prompt= "], "needs objective.class_prompt"),
    (["objective.num_class_images=0"], "num_class_images must be an integer ≥ 1"),
    (["objective.prior_loss_weight=-1"], "prior_loss_weight must be a number ≥ 0"),
    (["train_dataloader.dataset.streaming=True"], "needs a scanned dataset"),
])
def test_prior_preservation_mistakes_are_one_line(tiny_assets, tmp_path, change, message):
    from pgv25.objectives import objective_options

    with pytest.raises(UserError, match=message):
        objective_options(dreambooth_cfg(tmp_path, *change))


def test_an_instance_folder_without_images_is_one_line_before_any_generation(tiny_assets, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    options = prior_options(empty, tmp_path / "class") + ["tiny_dreambooth=None"]
    with pytest.raises(UserError, match="empty holds no images"):
        train(dreambooth_cfg(tmp_path / "w", *options))
    assert not (tmp_path / "class").exists()


def test_data_commands_see_the_class_images_training_will_use(instance_dir, tmp_path, caplog):
    from PIL import Image

    from test_cli import call, one_line_error

    class_dir = tmp_path / "class"
    options = prior_options(instance_dir, class_dir, "train_cfg.max_iters=1", "train_dataloader.dataset.cache.enabled=True",
                            f"work_dir={tmp_path / 'w'}", *TINY_OPTIONS)
    inspected = call("data", "inspect", DREAMBOOTH, "--out", str(tmp_path / "b.png"), "--cfg-options", *options)
    assert inspected.returncode == 0 and "4 of 4 class images are not drawn yet" in inspected.stdout
    one_line_error(call("data", "cache", DREAMBOOTH, "--cfg-options", *options), "draws them, then builds the cache")
    class_dir.mkdir()
    for i in range(4):  # the user's own class images count
        Image.new("RGB", (64, 64), (0, 0, 40 * i)).save(class_dir / f"mine_{i}.png")
    inspected = call("data", "inspect", DREAMBOOTH, "--out", str(tmp_path / "b.png"), "--cfg-options", *options)
    assert "class images (a circle on a white background)" in inspected.stdout and "6 usable" in inspected.stdout
    cached = call("data", "cache", DREAMBOOTH, "--cfg-options", *options)
    folder = cached.stdout.split("latent cache: ")[1].split()[0]
    with caplog.at_level(logging.INFO, logger="pgv25"):
        train(dreambooth_cfg(tmp_path / "w", *options))
    assert any(f"training from the latent cache {folder}" in r.message for r in caplog.records)  # the one just built
