import json

import pytest
import torch
from PIL import Image

from pgv25.data.dataset import build_dataset, collate
from pgv25.errors import UserError


def write_folder(root, n=4, broken=()):
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        name = f"{i}.png"
        if i in broken:
            (root / name).write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
        else:
            Image.new("RGB", (40, 30), (10 * i, 0, 0)).save(root / name)
        rows.append({"file_name": name, "text": f"caption {i}", "alt": [f"a{i}", f"b{i}"]})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def cfg(root, **extra):
    return {"data_dir": str(root), "resolution": 16, **extra}


def test_reads_an_image_folder_with_metadata(tmp_path):
    dataset = build_dataset(cfg(write_folder(tmp_path / "d")), seed=0)
    item = dataset[(0, 2)]
    assert item["caption"] == "caption 2" and item["pixels"].shape == (3, 16, 16)
    assert item["time_ids"].tolist()[:2] == [30, 40]


def test_items_are_deterministic_per_epoch_and_index(tmp_path):
    dataset = build_dataset(cfg(write_folder(tmp_path / "d"), caption_dropout=0.5), seed=0)
    a, b = dataset[(3, 1)], dataset[(3, 1)]
    assert torch.equal(a["pixels"], b["pixels"]) and a["drop_caption"] == b["drop_caption"]
    drops = {dataset[(e, 1)]["drop_caption"] for e in range(30)}
    assert drops == {True, False}


def test_list_captions_pick_one(tmp_path):
    dataset = build_dataset(cfg(write_folder(tmp_path / "d"), caption_column="alt"), seed=0)
    assert {dataset[(e, 0)]["caption"] for e in range(20)} == {"a0", "b0"}


def test_wrong_column_fails_with_the_available_columns(tmp_path):
    with pytest.raises(UserError, match="no column 'caption'.*text"):
        build_dataset(cfg(write_folder(tmp_path / "d"), caption_column="caption"), seed=0)


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        build_dataset(cfg(tmp_path / "nowhere"), seed=0)


def test_broken_image_is_skipped_and_counted(tmp_path):
    dataset = build_dataset(cfg(write_folder(tmp_path / "d", broken={1})), seed=0)
    batch = collate([dataset[(0, i)] for i in range(4)])
    assert batch["size"] == 3 and batch["skipped"] == 1 and batch["pixels"].shape[0] == 3
    assert collate([None, None]) == {"skipped": 2, "size": 0}
