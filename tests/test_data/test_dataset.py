import json

import numpy as np
import pytest
import torch

from pgv25.data.dataset import build_dataset, collate, plan_data
from pgv25.data.sampler import BucketBatchSampler
from pgv25.errors import UserError

from .files import BAD_FILES, png, write_folder


def cfg(root, **extra):
    return {"type": "folder", "path": str(root), "resolution": 16, **extra}


def mixed_folder(root):
    """Landscape, portrait and square images (8 each) with captions."""
    root.mkdir(parents=True)
    rows = []
    for i in range(24):
        size = [(64, 32), (32, 64), (40, 40)][i % 3]
        png(root / f"{i}.png", size=size, color=(i * 10, 0, 0))
        rows.append({"file_name": f"{i}.png", "text": [f"caption {i}", f"other {i}"]})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_square_crops_without_buckets(tmp_path):
    plan = plan_data(cfg(write_folder(tmp_path / "d")))
    dataset = build_dataset(cfg(tmp_path / "d"), plan, seed=0)
    item = dataset[(0, 0, 1)]
    assert item["pixels"].shape == (3, 16, 16) and item["caption"] == "caption 1"
    assert item["time_ids"].tolist()[:2] == [30, 40]


def test_buckets_follow_aspect_ratio_and_batches_share_one(tmp_path):
    options = cfg(mixed_folder(tmp_path / "d"), resolution=64, buckets={"step": 16, "weighting": "uniform"})
    plan = plan_data(options, global_batch=4)
    assert dict(plan.histogram()) == {(48, 80): 8, (64, 64): 8, (80, 48): 8}
    dataset = build_dataset(options, plan, seed=0)
    sampler = BucketBatchSampler(plan.bucket_of, 4, plan.weighting, seed=0)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate)
    shapes = set()
    for batch, _ in zip(loader, range(12)):
        shapes.add(tuple(batch["pixels"].shape[2:]))
        assert all(c.split()[0] in ("caption", "other") for c in batch["caption"])
    assert len(shapes) == 3


def test_same_batches_with_and_without_loader_workers(tmp_path):
    options = cfg(mixed_folder(tmp_path / "d"), resolution=64, buckets={"step": 16}, caption_dropout=0.3)
    plan = plan_data(options, global_batch=4)
    dataset = build_dataset(options, plan, seed=3)

    def batches(workers):
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=BucketBatchSampler(plan.bucket_of, 4, seed=3),
                                             collate_fn=collate, num_workers=workers)
        return [b for b, _ in zip(loader, range(6))]

    for a, b in zip(batches(0), batches(2)):
        assert torch.equal(a["pixels"], b["pixels"]) and a["caption"] == b["caption"]
        assert torch.equal(a["drop_caption"], b["drop_caption"])


def test_unreadable_files_are_skipped_and_named_not_fatal(tmp_path):
    extra = [{"file_name": name, "text": "bad"} for name in BAD_FILES]
    root = write_folder(tmp_path / "d", n=4, extra_rows=extra)
    for name, (writer, _) in BAD_FILES.items():
        writer(root / name)
    plan = plan_data(cfg(root))
    assert sorted(r for _, r in plan.index.problems) == ["empty file", "not an image"]
    dataset = build_dataset(cfg(root), plan, seed=0)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=BucketBatchSampler(plan.bucket_of, 5, seed=0),
                                         collate_fn=collate, num_workers=2)
    batch = next(iter(loader))  # 5 usable by the scan; the truncated JPEG fails only when decoded
    assert batch["size"] == 4 and batch["problems"] == [(str(root / "cut.jpg"), "truncated or corrupt image")]


def test_keep_uncaptioned_trains_them_unconditional(tmp_path):
    root = write_folder(tmp_path / "d", n=2, extra_rows=[{"file_name": "0.png", "text": ""}])
    assert len(plan_data(cfg(root)).index) == 2
    plan = plan_data(cfg(root, keep_uncaptioned=True))
    assert len(plan.index) == 3 and build_dataset(cfg(root), plan, 0)[(0, 0, 2)]["caption"] == ""


def test_caption_choice_and_dropout_are_seeded(tmp_path):
    root = write_folder(tmp_path / "d", n=4)
    options = cfg(root, caption_column="alt", caption_dropout=0.5)
    dataset = build_dataset(options, plan_data(options), seed=0)
    items = [dataset[(step, 0, 1)] for step in range(40)]
    assert {i["caption"] for i in items} == {"a1", "b1"} and 5 < sum(i["drop_caption"] for i in items) < 35
    assert dataset[(7, 0, 1)]["caption"] == items[7]["caption"]


def test_no_usable_images_fails_before_training(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    (root / "a.png").write_bytes(b"")
    (root / "a.txt").write_text("x")
    with pytest.raises(UserError, match=r"no usable images in .*: excluded 1 \(1 empty file\)"):
        plan_data(cfg(root))


def test_collate_of_only_bad_items():
    assert collate([{"problem": "not an image", "label": "x"}]) == {"problems": [("x", "not an image")], "size": 0}


def test_merged_buckets_keep_every_image(tmp_path):
    options = cfg(mixed_folder(tmp_path / "d"), resolution=64, buckets={"step": 16})
    plan = plan_data(options, global_batch=10)  # 8 per bucket < 10: merged into one
    assert sum(n for _, n in plan.histogram()) == 24 and len(plan.sizes) == 1
    assert np.all(plan.bucket_of == 0)


def test_a_held_out_split_is_stable_disjoint_and_follows_the_names_not_the_folder(tmp_path):
    """validation.loss.split: the same images stay out of training whatever the batch (process count) or a copy of the
    dataset elsewhere; each held-out image sits in the training bucket nearest its aspect ratio."""
    import shutil

    options = cfg(mixed_folder(tmp_path / "d"), resolution=64, buckets={"step": 16})
    plan = plan_data(options, global_batch=4, holdout=0.25)
    held = plan.held_out
    names = lambda p: sorted(p.rows.label(int(r)).split("/")[-1] for r in p.index.rows)  # noqa: E731
    assert 0 < len(held.index) < 24 and len(held.index) + len(plan.index) == 24
    assert not set(names(held)) & set(names(plan))
    assert names(plan_data(options, global_batch=8, holdout=0.25).held_out) == names(held)
    shutil.copytree(tmp_path / "d", tmp_path / "moved" / "d")
    assert names(plan_data(cfg(tmp_path / "moved" / "d", resolution=64, buckets={"step": 16}), 4, holdout=0.25).held_out) == names(held)
    for position, row in enumerate(held.index.rows):
        w, h = held.sizes[held.bucket_of[position]]
        image_w, image_h = held.index.widths[position], held.index.heights[position]
        assert (w > h) == (image_w > image_h) and (w < h) == (image_w < image_h)
    assert plan_data(options, global_batch=4).held_out is None
    with pytest.raises(UserError, match=r"validation.loss.split=0.999 leaves 0 images to train on"):
        plan_data(options, global_batch=4, holdout=0.999)
