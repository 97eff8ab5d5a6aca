import pytest
import json

import torch

from pgv25.tiny import ensure_tiny_assets
from pgv25.tiny.shapes import COLOURS, combinations, write_shapes_dataset


def test_pipeline_has_playground_classes_and_scheduler(tiny_assets):
    index = json.loads((tiny_assets["model"] / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert index["scheduler"] == ["diffusers", "EDMDPMSolverMultistepScheduler"]
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    assert index["force_zeros_for_empty_prompt"] is True
    scheduler = json.loads((tiny_assets["model"] / "scheduler" / "scheduler_config.json").read_text())
    expected = dict(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5, rho=7.0, prediction_type="epsilon",
                    solver_order=2, solver_type="midpoint", final_sigmas_type="zero")
    assert {k: scheduler[k] for k in expected} == expected
    vae = json.loads((tiny_assets["model"] / "vae" / "config.json").read_text())
    assert vae["scaling_factor"] == 0.5 and len(vae["latents_mean"]) == 4 and len(vae["latents_std"]) == 4
    unet = json.loads((tiny_assets["model"] / "unet" / "config.json").read_text())
    assert unet["addition_embed_type"] == "text_time"


def test_tokenizer_is_clip_style_bpe(tiny_pipeline):
    tokens = tiny_pipeline.tokenizer.tokenize("a red circle on a white background")
    assert tokens == ["a</w>", "red</w>", "circle</w>", "on</w>", "a</w>", "white</w>", "background</w>"]
    ids = tiny_pipeline.tokenizer("unseen words work too").input_ids
    assert ids[0] == tiny_pipeline.tokenizer.bos_token_id and ids[-1] == tiny_pipeline.tokenizer.eos_token_id
    assert (tiny_pipeline.tokenizer.get_vocab() == tiny_pipeline.tokenizer_2.get_vocab())


def test_second_call_is_cached(tiny_assets, monkeypatch):
    import pgv25.tiny
    from conftest import TINY

    def rebuilt(*args, **kwargs):
        raise AssertionError("assets with the same parameters were built again")

    monkeypatch.setattr(pgv25.tiny, "write_shapes_dataset", rebuilt)
    monkeypatch.setattr(pgv25.tiny, "build_base_pipeline", rebuilt)
    assert ensure_tiny_assets(tiny_assets["root"], **TINY) == tiny_assets["stamp"]


def test_shapes_dataset_is_deterministic(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert write_shapes_dataset(a, size=32, per_caption=1, seed=5) == len(combinations(held_out=False))
    write_shapes_dataset(b, size=32, per_caption=1, seed=5)
    for name in ("metadata.jsonl", "red_circle_on_white_0.png", "black_triangle_on_yellow_0.png"):
        assert (a / name).read_bytes() == (b / name).read_bytes()


def test_shapes_have_the_captioned_colours(tmp_path):
    from PIL import Image

    write_shapes_dataset(tmp_path, size=64, per_caption=1, seed=0)
    image = torch.tensor(list(Image.open(tmp_path / "blue_square_on_black_0.png").getdata()))
    assert tuple(image[0].tolist()) == COLOURS["black"]  # corners are background
    assert (image == torch.tensor(COLOURS["blue"])).all(1).sum() > 64 * 64 * 0.1


def test_spread_narrows_shape_size_and_position():
    import random

    import numpy as np
    import pytest

    from pgv25.tiny.shapes import draw

    def boxes(spread):
        rng = random.Random(0)
        out = []
        for _ in range(20):
            mask = np.asarray(draw("red", "square", "black", 64, rng, spread))[..., 0] > 127
            ys, xs = np.nonzero(mask)
            out.append((xs.min(), ys.min(), xs.max() - xs.min() + 1))
        return np.array(out)

    centred, narrow, full = boxes(0.0), boxes(0.3), boxes(1.0)
    assert (centred == centred[0]).all() and abs(centred[0, 2] - 0.55 * 64) <= 1  # every square the same, 55%, centred
    assert abs(centred[0, 0] - (64 - centred[0, 2]) / 2) <= 1
    assert (0 < np.ptp(narrow, axis=0)).all() and (np.ptp(narrow, axis=0) < 0.5 * np.ptp(full, axis=0)).all()
    with pytest.raises(ValueError, match="spread"):
        write_shapes_dataset("/nonexistent", spread=1.5)


def test_held_out_combinations_are_not_in_the_training_set(tiny_assets):
    from pgv25.tiny.shapes import HELD_OUT, caption, parse_caption

    rows = [json.loads(line) for line in (tiny_assets["shapes"] / "metadata.jsonl").read_text().splitlines()]
    trained = {parse_caption(r["text"]) for r in rows}
    assert len(HELD_OUT) == 6 and not trained & set(HELD_OUT)
    assert trained == set(combinations(held_out=False)) and len(trained) == 84
    for colour, shape, background in HELD_OUT:  # each part of a held-out prompt is seen in other combinations
        assert any(c == colour and s == shape for c, s, _ in trained) or any(c == colour for c, _, _ in trained)
        assert any(s == shape for _, s, _ in trained) and any(b == background for _, _, b in trained)
    assert parse_caption(caption("red", "circle", "white")) == ("red", "circle", "white")
    assert parse_caption("a red circle on white") is None and parse_caption("a pink circle on a white background") is None


def test_mixed_aspect_dataset(tmp_path):
    from PIL import Image

    from pgv25.tiny.shapes import aspect_plan

    assert aspect_plan(10, {"1:1": 0.6, "2:1": 0.2, "1:2": 0.2}) == ["1:1"] * 6 + ["2:1"] * 2 + ["1:2"] * 2
    n = write_shapes_dataset(tmp_path, size=64, per_caption=5, seed=0, aspects={"1:1": 0.6, "2:1": 0.2, "1:2": 0.2})
    rows = [json.loads(line) for line in (tmp_path / "metadata.jsonl").read_text().splitlines()]
    sizes = [Image.open(tmp_path / r["file_name"]).size for r in rows]
    assert n == len(rows) == 84 * 5
    assert sizes.count((64, 64)) == 84 * 3 and sizes.count((96, 48)) == 84 and sizes.count((48, 96)) == 84


@pytest.mark.slow
def test_text_encoder_pretraining_separates_captions(tiny_pipeline):
    from pgv25.tiny.base_pipeline import build_text_encoders, pretrain_text_encoders
    from pgv25.tiny.shapes import caption

    tokenizer = tiny_pipeline.tokenizer
    torch.manual_seed(0)
    encoders = build_text_encoders(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    captions = [caption(*c) for c in combinations(held_out=False)]
    ids = tokenizer(["a red circle on a white background", "a white circle on a red background"], padding="max_length",
                    max_length=77, return_tensors="pt").input_ids

    def similarity():
        with torch.no_grad():
            pooled = torch.nn.functional.normalize(encoders[1](ids).text_embeds, dim=1)
        return float(pooled[0] @ pooled[1])

    before = similarity()
    # similarity() after 100 steps is 0.31 here (0.48 after 80, 0.82 after 60)
    after_mean = pretrain_text_encoders(tokenizer, list(encoders), captions, steps=100, seed=0)
    assert before > 0.9  # random encoders barely tell swapped colours apart
    assert similarity() < 0.8 and after_mean < 0.5
