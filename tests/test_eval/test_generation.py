"""`pgv25 eval generate`: prompt files as MJHQ-30K and users write them, one image per prompt with a seed of its own,
written atomically, sharded over processes, resumable, and refused when a rerun would mix settings."""

import json
import logging

import pytest

from pgv25.cli import main
from pgv25.errors import UserError
from pgv25.eval.generation import generate_images, image_path, prompt_seed
from pgv25.eval.prompts import EvalPrompt, read_prompts

MJHQ = {  # MJHQ-30K's meta_data.json: {id: {category, prompt}}
    "5c1f": {"category": "animals", "prompt": "a red circle on a white background"},
    "9a0b": {"category": "animals", "prompt": "a blue square on a black background"},
    "77e2": {"category": "food", "prompt": "a white circle on a black background"},
}


def write_mjhq(folder, extra=None):
    path = folder / "meta_data.json"
    path.write_text(json.dumps({**MJHQ, **(extra or {})}))
    return path


def test_prompt_files_mjhq_jsonl_and_csv(tmp_path, caplog):
    mjhq = read_prompts(write_mjhq(tmp_path, {"dead": {"category": "food", "prompt": "  "}, "x/y": {"prompt": "no category"}}))
    assert [(p.id, p.category) for p in mjhq] == [("5c1f", "animals"), ("9a0b", "animals"), ("77e2", "food"), ("x_y", None)]
    assert "1 row(s) with no prompt skipped" in caplog.text  # counted and named, not a crash
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "one", "category": "art"}\nnot json\n{"prompt": "two", "id": "b"}\n{"prompt": "again", "id": "b"}\n')
    assert [(p.id, p.prompt, p.category) for p in read_prompts(jsonl)] == [("000000", "one", "art"), ("b", "two", None)]
    assert "1 row(s) with an id seen before" in caplog.text
    csv = tmp_path / "p.csv"
    csv.write_text("prompt,category\nfirst,logo\nsecond,logo\nthird,people\n")
    assert [p.prompt for p in read_prompts(csv, per_category=1)] == ["first", "third"]


@pytest.mark.parametrize("name, text, message", [
    ("missing.json", None, "does not exist"),
    ("p.txt", "a prompt", "unknown format '.txt'"),
    ("p.json", "{not json", "is not valid JSON"),
    ("p.csv", "text\nhello\n", "has no 'prompt' column"),
    ("p.jsonl", '{"prompt": ""}\n', "holds no usable prompt"),
])
def test_a_prompt_file_that_cannot_be_used_is_one_line(tmp_path, name, text, message):
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    with pytest.raises(UserError, match=message) as error:
        read_prompts(path)
    assert "\n" not in str(error.value)


def test_seeds_belong_to_ids():
    assert prompt_seed(0, "5c1f") == prompt_seed(0, "5c1f") != prompt_seed(1, "5c1f") != prompt_seed(0, "9a0b")


@pytest.mark.slow
def test_generates_sharded_resumes_only_the_missing_and_refuses_mixed_settings(tiny_assets, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    prompts_file, out = write_mjhq(tmp_path), tmp_path / "out"
    command = ["eval", "generate", "--model", str(tiny_assets["model"]), "--prompts", str(prompts_file), "--out", str(out),
               "--steps", "2", "--width", "64", "--height", "64"]
    assert main(command) == 0
    made = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*.png")}
    assert sorted(made) == ["animals/5c1f.png", "animals/9a0b.png", "food/77e2.png"]
    meta = json.loads((out / "meta_data.json").read_text())
    assert meta["77e2"] == {"category": "food", "prompt": MJHQ["77e2"]["prompt"], "seed": prompt_seed(0, "77e2")}
    # A process killed mid-write left a temporary file, and an image is missing: the rerun, over two processes,
    # makes that image alone, identical to before, and clears the leftover.
    (out / "animals" / "9a0b.png").unlink()
    (out / "animals" / ".9a0b.png.tmp123").write_bytes(b"half an image")
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_assets["model"])
    pipe.set_progress_bar_config(disable=True)
    prompts = read_prompts(prompts_file)
    counts = [generate_images(pipe, prompts, out, steps=2, width=64, height=64, rank=r, world_size=2, progress=False)
              for r in (0, 1)]
    assert [c["made"] for c in counts] == [0, 1] and sum(c["mine"] for c in counts) == 3
    assert {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*.png")} == made
    assert not list(out.rglob(".*.tmp*"))
    # Another setting would mix two kinds of images in one folder: one line, nothing made.
    code = main(command[:-4] + ["--width", "64", "--height", "64", "--steps", "3"])
    assert code == 2
    assert image_path(out, EvalPrompt("9a0b", "x", "animals")).is_file()


@pytest.mark.slow
def test_batched_prompts_keep_each_images_own_seed(tiny_pipeline, tmp_path):
    """Several prompts per pipeline call: every image from its own seed, as one at a time makes it (up to the
    batched kernels' rounding), written as its batch finishes; a partial last batch and a resumed set included."""
    import numpy as np
    from PIL import Image

    prompts = read_prompts(write_mjhq(tmp_path, {"0c0c": {"category": "food", "prompt": "a green square on a white background"},
                                                 "1d1d": {"category": "food", "prompt": "a red square on a black background"}}))
    one, batched = tmp_path / "one", tmp_path / "batched"
    generate_images(tiny_pipeline, prompts, one, steps=2, width=64, height=64, progress=False)
    generate_images(tiny_pipeline, prompts[:2], batched, steps=2, width=64, height=64, progress=False, batch_size=2)
    counts = generate_images(tiny_pipeline, prompts, batched, steps=2, width=64, height=64, progress=False, batch_size=2)
    assert counts["made"] == 3 and counts["present"] == 2  # batches of 2 and 1 for the three left

    def pixels(folder, prompt):
        return np.asarray(Image.open(image_path(folder, prompt)), dtype=np.int16)

    for prompt in prompts:
        # 8-bit pixels of the same image: a batched convolution may round a pixel's last step the other way
        assert np.abs(pixels(one, prompt) - pixels(batched, prompt)).max() <= 2, prompt.id
    assert not np.array_equal(pixels(one, prompts[0]), pixels(one, prompts[1]))  # different seeds, different images


def test_speed_options_are_checked_before_anything_loads(tmp_path):
    prompts_file = write_mjhq(tmp_path)
    common = ["--model", str(tmp_path / "nowhere"), "--prompts", str(prompts_file), "--out", str(tmp_path / "out")]
    assert main(["eval", "generate", *common, "--batch-size", "0"]) == 2
    assert main(["eval", "generate", *common, "--eager", "--compile"]) == 2
    assert not (tmp_path / "out").exists()
