"""Preference pairs: Pick-a-Pic and chosen/rejected sources, one bucket and one crop per pair, bad pairs counted."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from pgv25.data.dataset import build_dataset, collate, plan_data
from pgv25.data.pairs import NO_LABEL, TIE
from pgv25.data.sources import load_rows
from pgv25.errors import UserError

from .files import png, truncated_jpeg


def gradient(size, flip=False) -> Image.Image:
    """A left-to-right ramp with a bright top band: any crop or flip difference shows."""
    w, h = size
    x = np.linspace(0, 255, w)[None, :].repeat(h, 0)
    image = np.stack([x, 255 - x, np.zeros_like(x)], -1)
    image[: h // 4] = 255
    return Image.fromarray(image.astype(np.uint8)[:, ::-1] if flip else image.astype(np.uint8))


def write_pickapic(root, labels, sizes=((40, 40), (40, 40))):
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, label in enumerate(labels):
        png(root / f"{i}_0.png", sizes[0], (200, 0, 0))
        png(root / f"{i}_1.png", sizes[1], (0, 0, 200))
        row = {"caption": f"prompt {i}", "jpg_0": f"{i}_0.png", "jpg_1": f"{i}_1.png"}
        if label is not None:
            row["label_0"] = label
        rows.append(row)
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "pairs.jsonl"


def pair_cfg(path, kind="manifest", **pairs):
    return {"type": kind, "path": str(path), "caption_column": "caption", "resolution": 32, "pairs": pairs or True}


def test_pickapic_labels_decide_the_winner_and_ties_are_dropped_or_kept_both_ways(tmp_path):
    manifest = write_pickapic(tmp_path / "d", [1, 0, 0.5, None])
    rows = load_rows(pair_cfg(manifest))
    names = [(w.rsplit("/", 1)[-1], l.rsplit("/", 1)[-1]) for w, l in zip(rows.images, rows.losers)]
    assert names[:2] == [("0_0.png", "0_1.png"), ("1_1.png", "1_0.png")]
    assert rows.captions[2:] == [TIE, NO_LABEL]
    kept = load_rows(pair_cfg(manifest, keep_ties=True))
    tie = [(w.rsplit("/", 1)[-1], l.rsplit("/", 1)[-1]) for w, l, c in zip(kept.images, kept.losers, kept.captions) if c == ["prompt 2"]]
    assert tie == [("2_0.png", "2_1.png"), ("2_1.png", "2_0.png")]
    plan = plan_data(pair_cfg(manifest))
    assert len(plan.index) == 2 and plan.index.reasons() == {TIE: 1, NO_LABEL: 1}


def test_a_saved_hub_dataset_with_binary_image_columns(tmp_path):
    import datasets

    def encoded(color):
        buffer = io.BytesIO()
        Image.new("RGB", (48, 32), color).save(buffer, "JPEG")
        return buffer.getvalue()

    table = {"caption": ["a", "b", "c"], "jpg_0": [encoded((255, 0, 0)), encoded((0, 255, 0)), b"not a jpeg"],
             "jpg_1": [encoded((0, 0, 255))] * 3, "label_0": [0.0, 1.0, 1.0]}
    datasets.Dataset.from_dict(table).save_to_disk(str(tmp_path / "hub"))
    plan = plan_data(pair_cfg(tmp_path / "hub", kind="hub"))
    assert len(plan.index) == 2 and plan.index.reasons() == {"not an image": 1}
    dataset = build_dataset({"random_flip": False}, plan, seed=0)
    first = dataset[(0, 0, 0)]  # label_0 = 0: jpg_1 (blue) won
    assert first["pixels"].shape == (2, 3, 32, 32)
    assert first["pixels"][0, 2].mean() > 0.9 and first["pixels"][1, 0].mean() > 0.9
    assert first["time_ids"][0].tolist()[:2] == [32.0, 48.0]


def test_chosen_rejected_folder(tmp_path):
    folder = tmp_path / "f"
    folder.mkdir()
    png(folder / "good.png")
    png(folder / "bad.png")
    (folder / "metadata.jsonl").write_text(json.dumps({"chosen": "good.png", "rejected": "bad.png", "caption": "x"}) + "\n")
    rows = load_rows(pair_cfg(folder, kind="folder", format="chosen_rejected"))
    assert rows.images == [str(folder / "good.png")] and rows.losers == [str(folder / "bad.png")]


def test_missing_pair_columns_name_the_columns_found(tmp_path):
    (tmp_path / "m.jsonl").write_text(json.dumps({"caption": "x", "image": "a.png"}) + "\n")
    with pytest.raises(UserError, match=r"no pair column 'chosen', 'rejected'; its columns are \['caption', 'image'\]"):
        load_rows(pair_cfg(tmp_path / "m.jsonl"))
    with pytest.raises(UserError, match="pairs.format must be"):
        load_rows(pair_cfg(tmp_path / "m.jsonl", format="triplets"))


def test_a_pair_with_one_unreadable_image_is_skipped_and_counted(tmp_path):
    manifest = write_pickapic(tmp_path / "d", [1, 1, 1])
    (tmp_path / "d" / "1_1.png").unlink()  # found by the scan
    truncated_jpeg(tmp_path / "d" / "cut.jpg")
    lines = manifest.read_text().splitlines()
    lines[2] = lines[2].replace("2_1.png", "cut.jpg")  # found only when decoded
    manifest.write_text("\n".join(lines) + "\n")
    plan = plan_data(pair_cfg(manifest))
    assert len(plan.index) == 2 and plan.index.reasons() == {"file not found": 1}
    dataset = build_dataset({}, plan, seed=0)
    batch = collate([dataset[(0, slot, position)] for slot, position in enumerate(range(2))])
    assert batch["size"] == 1 and batch["problems"] == [(str(tmp_path / "d" / "2_0.png"), "truncated or corrupt image")]
    assert batch["pixels"].shape == (2, 3, 32, 32)


def test_both_images_get_one_bucket_the_same_relative_crop_and_the_same_flip(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    gradient((96, 48)).save(root / "w.png")  # the same picture at two sizes
    gradient((192, 96)).save(root / "l.png")
    (root / "m.jsonl").write_text(json.dumps({"chosen": "w.png", "rejected": "l.png", "caption": "x"}) + "\n")
    cfg = {**pair_cfg(root / "m.jsonl"), "buckets": {"enabled": True, "step": 16, "sizes": [[32, 32], [48, 16]]}}
    plan = plan_data(cfg)
    assert plan.sizes[plan.bucket_of[0]] == (48, 16)  # 2:1 images: the wide bucket, not the square
    dataset = build_dataset({"random_flip": True}, plan, seed=0)
    flips = set()
    for step in range(12):
        item = dataset[(step, 0, 0)]
        winner, loser = item["pixels"]
        assert (winner - loser).abs().mean() < 0.05, f"step {step}: the two crops differ"
        assert item["time_ids"][0, 2:].tolist() == item["time_ids"][1, 2:].tolist()  # same crop, same target
        assert item["time_ids"][0, :2].tolist() == [48, 96] and item["time_ids"][1, :2].tolist() == [96, 192]
        flips.add(bool(winner[0, 8, 0] > winner[0, 8, -1]))
    assert flips == {True, False}, "the flip is never (or always) drawn"


def test_collated_pairs_are_winners_then_losers_with_the_caption_repeated():
    items = [{"pixels": torch.full((2, 3, 4, 4), float(i)).index_fill_(0, torch.tensor([1]), -float(i)),
              "time_ids": torch.zeros(2, 6), "caption": f"c{i}", "drop_caption": i == 1} for i in (1, 2)]
    batch = collate(items)
    assert batch["size"] == 2 and batch["pixels"].shape == (4, 3, 4, 4)
    assert batch["pixels"][:, 0, 0, 0].tolist() == [1.0, 2.0, -1.0, -2.0]
    assert batch["caption"] == ["c1", "c2", "c1", "c2"] and batch["drop_caption"].tolist() == [True, False, True, False]
