"""Several datasets in one run: one scan and bucket plan, repeats or weights, each with its own captions."""

from types import SimpleNamespace

import numpy as np
import pytest

from pgv25.data.dataset import build_dataset, plan_data
from pgv25.data.inspect import part_shares, report
from pgv25.data.multi import dataset_config
from pgv25.errors import UserError

from .files import write_folder


def loader(*parts, **shared):
    return SimpleNamespace(dataset={"type": "folder", "path": "unused", "resolution": 16, **shared}, get=lambda k: list(parts))


@pytest.fixture
def folders(tmp_path):
    return write_folder(tmp_path / "few", n=3), write_folder(tmp_path / "many", n=12)


def test_repeats_oversample_and_inspect_shows_each_share(folders):
    few, many = folders
    plan = plan_data(dataset_config(loader({"path": str(few), "repeats": 4, "name": "instance"}, {"path": str(many)})))
    assert len(plan.index) == 3 * 4 + 12 and [p["repeats"] for p in plan.parts] == [4, 1]
    assert part_shares(plan) == pytest.approx([0.5, 0.5])
    text = report(plan)
    assert "instance" in text and "50.0%" in text and "4x" in text


def test_weights_become_repeats(folders):
    few, many = folders
    plan = plan_data(dataset_config(loader({"path": str(few), "weight": 1.0}, {"path": str(many), "weight": 3.0})))
    assert [p["repeats"] for p in plan.parts] == [1, 1] and part_shares(plan) == pytest.approx([0.2, 0.8])
    plan = plan_data(dataset_config(loader({"path": str(few), "weight": 3.0}, {"path": str(many), "weight": 1.0})))
    assert [p["repeats"] for p in plan.parts] == [12, 1] and part_shares(plan) == pytest.approx([0.75, 0.25])


def test_each_dataset_keeps_its_own_captions(folders):
    few, many = folders
    data_cfg = dataset_config(loader({"path": str(few), "captions": {"prefix": "TOK, "}},
                                     {"path": str(many), "captions": {"shuffle_tags": True}}))
    plan = plan_data(data_cfg)
    dataset = build_dataset(data_cfg, plan, seed=0)
    captions = {dataset[(0, 0, p)]["caption"] for p in range(len(plan.index))}
    assert sum(c.startswith("TOK, caption ") for c in captions) == 3
    assert sum(c.startswith("caption ") for c in captions) == 12


@pytest.mark.parametrize("parts, message", [
    ([{"path": "x", "repeats": 0}], "repeats must be an integer"),
    ([{"path": "x", "weight": 0.0}, {"path": "y", "weight": 0.0}], "weights sum to 0"),
    ([{"path": "x", "weight": 1.0, "repeats": 2}], "not both"),
    ([{"path": "x", "weight": 1.0}, {"path": "y"}], "every dataset a weight"),
    ([{"path": "x", "resolution": 32}], "set it in train_dataloader.dataset"),
    ([{"type": "folder"}], "needs a path"),
    ([{"path": "x", "pairs": {"format": "auto"}}], "preference pairs"),
])
def test_bad_lists_are_one_line_before_anything_is_read(parts, message):
    with pytest.raises(UserError, match=message):
        plan_data(dataset_config(loader(*parts)))


def test_a_dataset_without_usable_images_is_named(folders, tmp_path):
    few, _ = folders
    empty = write_folder(tmp_path / "empty", n=0, extra_rows=[{"file_name": "gone.png", "text": "x"}])
    with pytest.raises(UserError, match="folder:.*empty has no usable image"):
        plan_data(dataset_config(loader({"path": str(few)}, {"path": str(empty)})))


def test_training_from_two_datasets(tiny_assets, tmp_path):
    import json

    from conftest import tiny_cfg
    from pgv25.engine.runner import Trainer

    cfg = tiny_cfg(tmp_path, "train_cfg.max_iters=2", "default_hooks.checkpoint.interval=2", "sample_grid.prompts=[]")
    shapes = str(tiny_assets["shapes"])
    cfg.train_dataloader.datasets = [dict(path=shapes, captions=dict(prefix="TOK, "), repeats=2), dict(path=shapes)]
    trainer = Trainer(cfg)
    plan = trainer.data.plan
    assert [p["repeats"] for p in plan.parts] == [2, 1] and len(plan.index) == 3 * plan.parts[1]["usable"]
    result = trainer.run()
    assert result.step_dir.is_dir()
    losses = [json.loads(line)["loss"] for line in (tmp_path / "scalars.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and np.isfinite(losses).all()


def test_one_caption_for_a_folder_without_captions(tmp_path):
    from .files import png

    bare = tmp_path / "my_dog"
    bare.mkdir()
    for i in range(3):
        png(bare / f"{i}.png", color=(i * 50, 0, 0))
    with pytest.raises(UserError, match="no usable images"):  # no captions at all
        plan_data({"type": "folder", "path": str(bare), "resolution": 16})
    plan = plan_data({"type": "folder", "path": str(bare), "resolution": 16, "caption": "a photo of TOK dog"})
    assert len(plan.index) == 3 and {c[0] for c in plan.rows.captions} == {"a photo of TOK dog"}
    with pytest.raises(UserError, match="caption must be a non-empty string"):
        plan_data({"type": "folder", "path": str(bare), "resolution": 16, "caption": ""})


def test_streaming_cannot_be_combined():
    with pytest.raises(UserError, match="streaming datasets cannot be combined"):
        dataset_config(loader({"path": "x"}, streaming=True))
