"""`dataset.filters`: a curated subset by numeric columns, excluded rows counted by reason."""

import json

import pytest

from pgv25.cli import main
from pgv25.data.dataset import plan_data
from pgv25.errors import UserError

from .files import png


def scored_folder(root, scores):
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, score in enumerate(scores):
        png(root / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": f"caption {i}", **({} if score is None else {"aesthetic": score})})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def cfg(path, filters, kind="folder"):
    return {"type": kind, "path": str(path), "resolution": 32, "filters": filters}


def test_rows_outside_the_range_are_excluded_and_counted_by_reason(tmp_path):
    folder = scored_folder(tmp_path / "d", [7.5, 5.9, 6.0, None, "n/a", 9.1])
    plan = plan_data(cfg(folder, {"aesthetic": {"min": 6.0}}))
    assert sorted(int(r) for r in plan.index.rows) == [0, 2, 5]  # the bound is inclusive
    assert plan.index.reasons() == {"aesthetic < 6": 1, "no numeric aesthetic": 2}
    plan = plan_data(cfg(folder, {"aesthetic": {"min": 6, "max": 9}}))
    assert sorted(int(r) for r in plan.index.rows) == [0, 2] and plan.index.reasons()["aesthetic > 9"] == 1


def test_csv_cells_and_a_saved_hub_dataset(tmp_path):
    import datasets
    from PIL import Image

    png(tmp_path / "a.png")
    (tmp_path / "m.csv").write_text("image,text,score\na.png,x,0.2\na.png,y,0.8\n")
    plan = plan_data({**cfg(tmp_path / "m.csv", {"score": {"max": 0.5}}, "manifest")})
    assert [int(r) for r in plan.index.rows] == [0]
    table = {"image": [Image.new("RGB", (32, 32))] * 3, "text": ["a", "b", "c"], "aesthetic": [4.0, 6.5, 8.0]}
    datasets.Dataset.from_dict(table, features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string"),
                                                                    "aesthetic": datasets.Value("float32")})).save_to_disk(str(tmp_path / "hub"))
    plan = plan_data(cfg(tmp_path / "hub", {"aesthetic": {"min": 6}}, "hub"))
    assert [int(r) for r in plan.index.rows] == [1, 2] and plan.index.reasons() == {"aesthetic < 6": 1}


@pytest.mark.parametrize("filters, message", [
    ({"aesthetic": 6}, "must be dict\\(min=...\\)"),
    ({"aesthetic": {"above": 6}}, "must be dict\\(min=...\\)"),
    ({"aesthetic": {"min": "high"}}, "min and max must be numbers"),
    ({"aesthetic": {"min": 7, "max": 6}}, "min 7 is above max 6"),
    ({"clip_score": {"min": 0.3}}, "has no column 'clip_score' to filter on; its columns are \\['aesthetic', 'file_name', 'text'\\]"),
])
def test_filter_mistakes_are_one_line(tmp_path, filters, message):
    folder = scored_folder(tmp_path / "d", [7.0])
    with pytest.raises(UserError, match=message):
        plan_data(cfg(folder, filters))


def test_a_folder_without_metadata_has_nothing_to_filter_on(tmp_path):
    png(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(UserError, match="filters needs columns to filter on"):
        plan_data(cfg(tmp_path, {"aesthetic": {"min": 6}}))


def test_data_inspect_reports_what_the_filter_removed(tmp_path, tiny_assets, capsys):
    folder = scored_folder(tmp_path / "d", [7.0, 3.0, 8.0, 2.0])
    assert main(["data", "inspect", "playgroundv2_5_tiny_shapes", "--out", str(tmp_path / "b.png"), "--cfg-options",
                 "tiny_assets.per_caption=2", "tiny_assets.vae_steps=20", "tiny_assets.text_steps=40",
                 f"train_dataloader.dataset.path={folder}", "train_dataloader.dataset.filters.aesthetic.min=6",
                 "train_dataloader.batch_size=1"]) == 0
    out = capsys.readouterr().out
    assert "4 rows, 2 usable, excluded 2 (2 aesthetic < 6)" in out
    assert (tmp_path / "excluded_rows.txt").read_text().count("aesthetic < 6") == 2
