"""The shapes evaluator is itself checked: perfect on the dataset's own images, chance on noise."""

import json
import random
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from pgv25.eval.shapes import evaluate_images, read_image
from pgv25.tiny.shapes import COLOURS, HELD_OUT, combinations, draw


def ground_truth(per=2, size=64, seed=0):
    rng = random.Random(seed)
    return [(c, draw(*c, size, rng)) for c in combinations() for _ in range(per)]


@pytest.mark.parametrize("size", [32, 64, 128])
def test_dataset_images_score_100_percent(size):
    scores, _ = evaluate_images(ground_truth(size=size))
    assert scores["background_accuracy"] == scores["shape_colour_accuracy"] == scores["shape_accuracy"] == 1.0
    assert scores["black_background_rgb_error"] < 1 and scores["white_background_rgb_error"] < 1


def test_noise_scores_chance():
    rng = np.random.default_rng(0)
    items = [(c, Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))) for c in combinations() for _ in range(4)]
    scores, _ = evaluate_images(items)
    assert abs(scores["background_accuracy"] - 1 / 6) < 0.06  # 6 backgrounds
    assert abs(scores["shape_colour_accuracy"] - 1 / 5) < 0.06  # 5 colours other than the background
    assert scores["shape_accuracy"] <= 0.4  # 3 shapes


def test_grey_background_is_read_with_its_error():
    image = Image.new("RGB", (64, 64), (40, 40, 40))  # a model that drifts to dark grey instead of black
    reading = read_image(image)
    assert reading.background == "black" and abs(reading.background_error - 40) < 1e-6 and reading.shape is None
    assert abs(reading.black_error - 40) < 1e-6 and abs(reading.white_error - 215) < 1e-6


def test_a_missed_extreme_background_still_counts_in_its_error():
    grey = Image.new("RGB", (64, 64), (128, 128, 128))  # asked for black, drawn mid-grey (read as some other colour)
    scores, readings = evaluate_images([(("red", "circle", "black"), grey), (("red", "circle", "black"), Image.new("RGB", (64, 64)))])
    assert readings[0][1].background != "black"
    assert abs(scores["black_background_rgb_error"] - 64) < 1e-6 and scores["white_background_rgb_error"] is None


def test_each_shape_and_colour_is_told_apart():
    rng = random.Random(1)
    for colour in COLOURS:
        for shape in ("circle", "square", "triangle"):
            background = "black" if colour != "black" else "white"
            reading = read_image(draw(colour, shape, background, 64, rng))
            assert (reading.shape_colour, reading.shape, reading.background) == (colour, shape, background)


@pytest.mark.parametrize("aspect", ["1:1", "2:1", "1:2"])
def test_dataset_images_are_whole_and_inside_the_frame_at_every_aspect(aspect):
    from pgv25.tiny.shapes import aspect_size

    rng = random.Random(3)
    items = [(c, draw(*c, aspect_size(64, aspect), rng)) for c in combinations() for _ in range(2)]
    scores, _ = evaluate_images(items)
    assert scores["inside_frame"] == scores["whole_shape_accuracy"] == scores["shape_accuracy"] == 1.0
    assert scores["background_accuracy"] == scores["shape_colour_accuracy"] == 1.0


def test_specks_and_a_faint_ring_do_not_change_the_shape():
    """What a tiny VAE's decoder leaves behind: a bright speck in a corner, a faint ring near the edge."""
    from PIL import ImageDraw

    rng = random.Random(5)
    for shape in ("circle", "square", "triangle"):
        image = draw("red", shape, "white", 64, rng)
        pen = ImageDraw.Draw(image)
        pen.rectangle((2, 2, 3, 3), fill=(250, 120, 120))  # a speck far from the shape
        pen.rectangle((2, 60, 2, 60), fill=(200, 60, 60))
        reading = read_image(image)
        assert (reading.shape_colour, reading.shape, reading.background) == ("red", shape, "white")


def test_a_shape_cut_by_the_frame_is_not_whole():
    from PIL import ImageDraw

    image = Image.new("RGB", (96, 48), COLOURS["white"])
    ImageDraw.Draw(image).ellipse((70, 10, 110, 50), fill=COLOURS["red"])  # runs off the right and bottom edges
    reading = read_image(image)
    assert reading.background == "white" and reading.shape_colour == "red" and not reading.inside
    scores, _ = evaluate_images([(("red", "circle", "white"), image)])
    assert scores["whole_shape_accuracy"] == 0.0


@pytest.mark.slow
def test_eval_command_writes_table_json_and_worst_cases(tiny_assets, tmp_path):
    result = subprocess.run([sys.executable, "-m", "pgv25.cli", "eval", "shapes", "--model", str(tiny_assets["model"]),
                             "--per-prompt", "1", "--steps", "2", "--limit", "3", "--aspect", "1:1", "2:1",
                             "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "shape colour" in result.stdout and "2:1 held-out" in result.stdout
    report = json.loads((tmp_path / "shapes_eval.json").read_text())
    assert list(report["scores"]) == ["1:1 seen", "1:1 held-out", "2:1 seen", "2:1 held-out"]
    assert all(group["images"] == 3 for group in report["scores"].values()) and len(report["images"]) == 12
    assert sorted({tuple(row["size"]) for row in report["images"]}) == [(64, 64), (96, 48)]
    held_out = [row["asked"] for row in report["images"][3:6]]
    assert [(a["colour"], a["shape"], a["background"]) for a in held_out] == list(HELD_OUT[:3])
    assert Image.open(tmp_path / "shapes_eval_worst.png").size[0] > 0


def test_a_new_colour_is_read_as_itself_only_when_the_palette_has_it():
    from pgv25.eval.shapes import prompts_for

    magenta = draw((255, 0, 255), "circle", "white", 64, random.Random(0))
    assert read_image(magenta).shape_colour != "magenta"  # without it, some dataset colour
    reading = read_image(magenta, {"magenta": (255, 0, 255)})
    assert (reading.shape_colour, reading.shape, reading.background) == ("magenta", "circle", "white")
    assert read_image(draw("red", "square", "black", 64, random.Random(0)), {"magenta": (255, 0, 255)}).shape_colour == "red"
    assert prompts_for([("magenta", "circle", "white")], {"magenta": "zwx"}) == ["a zwx circle on a white background"]
    with pytest.raises(ValueError, match="already one of the dataset's colours"):
        read_image(magenta, {"red": (250, 0, 0)})


def test_rings_are_read_only_when_asked_and_every_old_shape_stays_itself():
    from pgv25.eval.shapes import prompts_for

    rng = random.Random(2)
    for colour, background in (("red", "white"), ("blue", "yellow"), ("white", "black"), ("green", "red")):
        ring = draw(colour, "ring", background, 64, rng)
        assert read_image(ring).shape != "ring"  # the default evaluator knows three shapes
        reading = read_image(ring, rings=True)
        assert (reading.shape_colour, reading.shape, reading.background) == (colour, "ring", background)
        for shape in ("circle", "square", "triangle"):
            assert read_image(draw(colour, shape, background, 64, rng), rings=True).shape == shape
    assert prompts_for([("red", "ring", "white")], {"ring": "zwx circle"}) == ["a red zwx circle on a white background"]
