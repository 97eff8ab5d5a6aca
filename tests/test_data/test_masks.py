"""Masked loss, data side: where masks come from (a file beside the image, a column, the alpha channel), that
they follow the image's resize, crop and flip, what a bad mask costs (its row, counted), and the settings."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from pgv25.data.dataset import build_dataset, collate, plan_data
from pgv25.data.masks import EMPTY_MASK, MASK_SIZE, NO_ALPHA, NO_MASK, BAD_MASK
from pgv25.data.streaming import check_streaming
from pgv25.errors import UserError


def half_image(path, size=(64, 32)):
    """Left half red, right half blue: the mask below marks the red half."""
    pixels = np.zeros((size[1], size[0], 3), np.uint8)
    pixels[:, : size[0] // 2] = (255, 0, 0)
    pixels[:, size[0] // 2 :] = (0, 0, 255)
    Image.fromarray(pixels).save(path)
    return path


def half_mask(path, size=(64, 32), left=255, right=0):
    values = np.full((size[1], size[0]), right, np.uint8)
    values[:, : size[0] // 2] = left
    Image.fromarray(values, "L").save(path)
    return path


def folder(root, n=4, size=(64, 32)):
    """n half-red images with captions in .txt files and a half-white `_mask.png` beside each."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        half_image(root / f"{i}.png", size)
        half_mask(root / f"{i}_mask.png", size)
        (root / f"{i}.txt").write_text(f"caption {i}")
    return root


def cfg(root, mask=None, **extra):
    return {"type": "folder", "path": str(root), "resolution": 32, "mask": mask or {"source": "file"}, **extra}


def items(options, plan, seeds=range(6)):
    dataset = build_dataset(options, plan, seed=0)
    return [dataset[(step, 0, position)] for step in seeds for position in range(len(plan.index))]


def test_mask_files_are_not_images_and_follow_crop_and_flip(tmp_path):
    options = cfg(folder(tmp_path / "d"), buckets={"step": 16})  # 64×32 images: a 48×16-style bucket, random crops
    plan = plan_data(options)
    assert len(plan.index) == 4  # the _mask.png files are masks, not training images
    flipped = 0
    for item in items(options, plan):
        weights, red = item["loss_weights"][0].float(), item["pixels"][0] > 0  # red channel +1 on the red half
        assert weights.dtype == torch.float32 and weights.shape == item["pixels"].shape[1:]
        # the weight is 1 where the image is red and 0 where blue, up to the one resampled column at the edge
        assert (weights[red] > 0.5).float().mean() > 0.9 and (weights[~red] < 0.5).float().mean() > 0.9
        flipped += bool(weights[:, -1].mean() > weights[:, 0].mean())  # red on the right: mirrored
    assert 0 < flipped < 24  # both orientations were drawn


def test_unmasked_weight_and_normalize(tmp_path):
    root = folder(tmp_path / "d", n=2, size=(32, 32))
    options = cfg(root, {"source": "file", "unmasked_weight": 0.25}, random_flip=False)
    weights = items(options, plan_data(options), [0])[0]["loss_weights"]
    assert set(np.unique(weights.numpy()).round(3)) == {0.25, 1.0}
    options = cfg(root, {"source": "file", "unmasked_weight": 0.25, "normalize": True})
    normalized = items(options, plan_data(options), [0])[0]["loss_weights"]
    assert float(normalized.float().mean()) == pytest.approx(1.0, rel=2e-3)  # fp16 storage
    assert float(normalized.max() / normalized.min()) == pytest.approx(4.0, rel=2e-3)


def test_bad_masks_are_excluded_and_counted(tmp_path, caplog):
    root = folder(tmp_path / "d", n=6)
    (root / "1_mask.png").unlink()  # missing
    half_mask(root / "2_mask.png", size=(32, 32))  # another size than its image
    (root / "3_mask.png").write_bytes(b"not a png")  # unreadable
    plan = plan_data(cfg(root))
    assert len(plan.index) == 3
    assert sorted(reason for _, reason in plan.index.problems) == sorted([NO_MASK, MASK_SIZE, BAD_MASK])
    # missing='full': an image without a mask trains with weight 1 everywhere; a bad mask still costs its row
    options = cfg(root, {"source": "file", "missing": "full"})
    plan = plan_data(options)
    assert len(plan.index) == 4
    position = [plan.rows.label(int(r)) for r in plan.index.rows].index(str(root / "1.png"))
    assert bool((items(options, plan, [0])[position]["loss_weights"] == 1).all())


def test_all_black_mask_is_skipped_when_decoded(tmp_path):
    root = folder(tmp_path / "d", n=2)
    half_mask(root / "0_mask.png", left=0, right=0)
    plan = plan_data(cfg(root))  # the header is fine: the scan keeps it
    batch = collate(items(cfg(root), plan, [0]))
    assert batch["size"] == 1 and batch["problems"] == [(str(root / "0.png"), EMPTY_MASK)]
    # with an unmasked weight, black is a weight like any other
    options = cfg(root, {"source": "file", "unmasked_weight": 0.1})
    assert collate(items(options, plan_data(options), [0]))["size"] == 2


def test_mask_column_of_a_manifest(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    rows = []
    for i in range(3):
        half_image(root / f"img{i}.png")
        half_mask(root / f"m{i}.png")
        rows.append({"file_name": f"img{i}.png", "text": f"caption {i}", "mask": f"m{i}.png" if i < 2 else ""})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    options = cfg(root, {"source": "column"})
    plan = plan_data(options)
    assert len(plan.index) == 2 and [reason for _, reason in plan.index.problems] == [NO_MASK]
    assert all(float(item["loss_weights"].float().mean()) == pytest.approx(0.5, abs=0.05) for item in items(options, plan, [0]))
    with pytest.raises(UserError, match="no mask column 'seg'"):
        plan_data(cfg(root, {"source": "column", "column": "seg"}))


def test_alpha_channel(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., 0], rgba[:, :16, 3] = 255, 255  # red, opaque on the left
    Image.fromarray(rgba, "RGBA").save(root / "a.png")
    Image.new("RGB", (32, 32), (0, 255, 0)).save(root / "b.png")  # no alpha: excluded
    for name in ("a", "b"):
        (root / f"{name}.txt").write_text("x")
    options = cfg(root, {"source": "alpha"}, random_flip=False)
    plan = plan_data(options)
    assert len(plan.index) == 1 and [reason for _, reason in plan.index.problems] == [NO_ALPHA]
    weights = items(options, plan, [0])[0]["loss_weights"][0]
    assert bool((weights[:, :15] == 1).all()) and bool((weights[:, 17:] == 0).all())


def test_several_datasets_mix_masked_and_unmasked(tmp_path):
    masked = folder(tmp_path / "masked", n=2, size=(32, 32))
    plain = tmp_path / "plain"
    plain.mkdir()
    for i in range(2):
        half_image(plain / f"{i}.png", (32, 32))
        (plain / f"{i}.txt").write_text("plain")
    options = {"resolution": 32, "parts": [{"type": "folder", "path": str(masked), "mask": {"source": "file"}},
                                           {"type": "folder", "path": str(plain)}]}
    plan = plan_data(options)
    batch = collate(items(options, plan, [0]))
    means = batch["loss_weights"].float().mean((1, 2, 3)).tolist()
    assert sorted(round(m, 1) for m in means) == [0.5, 0.5, 1.0, 1.0]  # the plain dataset weighs 1 everywhere


@pytest.mark.parametrize("mask, message", [
    ({"source": "segment"}, "mask.source must be one of 'file', 'column', 'alpha'"),
    ({"source": "file", "weight": 1}, "mask.weight is not a setting"),
    ({"source": "file", "unmasked_weight": 1.5}, "unmasked_weight must be a number from 0 to 1"),
    ({"source": "file", "missing": "ignore"}, "mask.missing must be 'skip' or 'full'"),
    ({"source": "file", "suffix": ""}, "mask.suffix must be a non-empty"),
    ({"source": "column"}, "an image folder without one has masks as files"),
    ("alphas", "mask.source must be one of"),
])
def test_mistakes_are_one_line(tmp_path, mask, message):
    with pytest.raises(UserError, match=message):
        plan_data(cfg(folder(tmp_path / "d", n=1), mask))


def test_refused_with_pairs_and_streaming():
    with pytest.raises(UserError, match="not supported with preference pairs"):
        plan_data({"type": "manifest", "path": "x.jsonl", "resolution": 32, "pairs": {"format": "auto"}, "mask": {"source": "file"}})
    with pytest.raises(UserError, match="not read in streaming mode"):
        check_streaming({"type": "hub", "path": "x", "streaming": True, "mask": {"source": "column"}})


def test_a_changed_mask_rescans(tmp_path):
    root = folder(tmp_path / "d", n=2)
    options = cfg(root, cache_dir=str(tmp_path / "cache"))
    assert len(plan_data(options).index) == 2
    buffer = io.BytesIO()
    Image.new("L", (10, 10)).save(buffer, "PNG")
    (root / "0_mask.png").write_bytes(buffer.getvalue())  # now the wrong size: the stored scan must not be reused
    assert len(plan_data(options).index) == 1


def test_mask_column_of_a_saved_hub_dataset(tmp_path):
    import datasets

    for i in range(3):
        half_image(tmp_path / f"{i}.png")
        half_mask(tmp_path / f"{i}_m.png")
    table = datasets.Dataset.from_dict({"image": [str(tmp_path / f"{i}.png") for i in range(3)], "text": ["a", "b", "c"],
                                        "mask": [str(tmp_path / f"{i}_m.png") for i in range(2)] + [None]})
    table = table.cast_column("image", datasets.Image()).cast_column("mask", datasets.Image())
    table.save_to_disk(str(tmp_path / "saved"))
    options = {"type": "hub", "path": str(tmp_path / "saved"), "resolution": 32, "mask": {"source": "column"}}
    plan = plan_data(options)
    assert len(plan.index) == 2 and [reason for _, reason in plan.index.problems] == [NO_MASK]  # the row without one
    assert all(float(i["loss_weights"].float().mean()) == pytest.approx(0.5, abs=0.05) for i in items(options, plan, [0]))
    with pytest.raises(UserError, match="a hub dataset's masks come from a column"):
        plan_data({**options, "mask": {"source": "file"}})


def test_masks_of_exif_rotated_photos_match_the_displayed_size(tmp_path):
    from .files import jpeg

    root = tmp_path / "d"
    root.mkdir()
    jpeg(root / "tall.jpg", size=(40, 30), orientation=6)  # stored 40×30, displayed 30×40
    Image.new("L", (30, 40), 255).save(root / "tall_mask.png")
    jpeg(root / "wrong.jpg", size=(40, 30), orientation=6)
    Image.new("L", (40, 30), 255).save(root / "wrong_mask.png")  # the stored size, not the displayed one
    for name in ("tall", "wrong"):
        (root / f"{name}.txt").write_text(name)
    plan = plan_data(cfg(root))
    assert [plan.rows.label(int(r)) for r in plan.index.rows] == [str(root / "tall.jpg")]
    assert [reason for _, reason in plan.index.problems] == [MASK_SIZE]
