"""Validation grids: made before the first iteration and every N, logged, and invisible to the training RNG."""

import pytest
import json

import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import tiny_cfg
from pgv25.engine.runner import train

OPTIONS = ["validation.prompts=[a red circle on a white background,a blue square on a black background]", "train_cfg.max_iters=4", "default_hooks.checkpoint.interval=4", "sample_grid.prompts=[]", "ema.enabled=True",
           "ema.warmup=False", "ema.decay=0.5"]


def losses(work):
    return [json.loads(line)["loss"] for line in (work / "scalars.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_validation_grids_do_not_change_training(tiny_assets, tmp_path):
    cfg = tiny_cfg(tmp_path / "a", *OPTIONS, "validation.interval=2")
    cfg.train_dataloader.dataset.captions = dict(prefix="TOK, ")
    # as fine-tuners write them: one prompt wide with its own seed and negative prompt, one square by default
    cfg.validation.prompts = [dict(prompt="TOK, a red circle on a white background", width=80, height=48, seed=3,
                                   negative_prompt="blue"), "TOK, a blue square on a black background"]
    with_grids = train(cfg)
    plain = tiny_cfg(tmp_path / "b", *OPTIONS)
    plain.train_dataloader.dataset.captions = dict(prefix="TOK, ")
    without = train(plain)
    grids = sorted(p.name for p in (tmp_path / "a" / "validation").glob("*.png"))
    assert grids == ["iter_0000000.png", "iter_0000002.png", "iter_0000004.png"]
    assert not (tmp_path / "b" / "validation").exists()
    # the same losses and weights to the last bit: sampling drew nothing from the training RNG
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    a = load_file(with_grids.step_dir / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(without.step_dir / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # with EMA: an EMA row and a raw row, one column per prompt
    grid = Image.open(tmp_path / "a" / "validation" / "iter_0000004.png")
    assert grid.size == (2 * 192, 2 * (192 + 28))
    first, last = (Image.open(tmp_path / "a" / "validation" / f"iter_000000{i}.png") for i in (0, 4))
    assert first.tobytes() != last.tobytes()

    # the export's model card shows this iteration's images of the exported (EMA) weights, at their own sizes
    from huggingface_hub import ModelCard

    card = ModelCard.load(with_grids.step_dir / "README.md")
    widget = card.data.widget
    assert [w["text"] for w in widget] == ["TOK, a red circle on a white background", "TOK, a blue square on a black background"]
    assert [Image.open(with_grids.step_dir / w["output"]["url"]).size for w in widget] == [(80, 48), (64, 64)]
    manifest = json.loads((with_grids.step_dir / "pgv25_manifest.json").read_text())["files"]
    assert {"README.md", "images/sample_0.png", "images/sample_1.png"} <= set(manifest)
    assert card.data.trigger_words == ["TOK"] and "playground-v2.5" in card.data.tags
    assert card.data.license == "other" and card.data.license_name == "playground-v2dot5-community"
    assert card.data.get("base_model") is None  # a local folder is no hub id
    assert "StableDiffusionXLPipeline.from_pretrained" in card.text and "EMA: decay 0.5" in card.text
    assert ModelCard.load(without.step_dir / "README.md").data.get("widget") is None  # no validation at iteration 4


def test_validation_grid_is_in_tensorboard(tiny_assets, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator

    train(tiny_cfg(tmp_path, *OPTIONS, "validation.interval=4", "ema.enabled=False"))
    events = EventAccumulator(str(next((tmp_path / "tensorboard").rglob("events.out.tfevents.*")).parent), size_guidance={IMAGES: 0})
    events.Reload()
    assert [e.step for e in events.Images("validation")] == [0, 4]


def test_validation_that_runs_out_of_memory_is_turned_off_not_fatal(tiny_assets, tmp_path, monkeypatch, caplog):
    """A card that holds the training step but not the sampling pipeline beside it: the run goes on, with a line."""
    from pgv25.engine.validation import ValidationSampler

    made = ValidationSampler._images
    calls = []

    def short_of_memory(self):
        calls.append(self.unet.training)
        if len(calls) == 2:  # the grid at iteration 2 (with EMA: its first half)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 6.00 GiB")
        return made(self)

    monkeypatch.setattr(ValidationSampler, "_images", short_of_memory)
    with caplog.at_level("WARNING", logger="pgv25"):
        result = train(tiny_cfg(tmp_path, *OPTIONS, "validation.interval=2", "ema.enabled=False"))
    assert result.iteration == 4 and (result.step_dir / "unet").is_dir()
    assert [p.name for p in (tmp_path / "validation").glob("*.png")] == ["iter_0000000.png"]  # none after the failure
    assert calls == [False, False]  # sampled in eval mode, twice, then never again
    warnings = [r.getMessage() for r in caplog.records if "ran out of memory" in r.getMessage()]
    assert len(warnings) == 1 and "validation samples at iteration 2 ran out of memory on cpu; training goes on" in warnings[0]
    assert losses(tmp_path) == losses_without_validation(tiny_assets, tmp_path / "plain")  # training untouched


def test_a_final_sample_grid_short_of_memory_leaves_the_finished_export_and_a_command(tiny_assets, tmp_path, monkeypatch, caplog):
    from pgv25.engine import saving

    def short_of_memory(trainer, step_dir):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")

    monkeypatch.setattr(saving, "sample_grid", short_of_memory)
    options = [o for o in OPTIONS if not o.startswith(("sample_grid", "train_cfg"))]
    with caplog.at_level("WARNING", logger="pgv25"):
        result = train(tiny_cfg(tmp_path, *options, "train_cfg.max_iters=2", "sample_grid.prompts=[a red circle]",
                                "ema.enabled=False"))
    assert result.grid is None and (result.step_dir / "model_index.json").is_file()
    warnings = [r.getMessage() for r in caplog.records if "sample grid ran out of memory" in r.getMessage()]
    assert len(warnings) == 1 and f"pgv25 generate --model {result.step_dir} --prompt" in warnings[0]


def losses_without_validation(tiny_assets, work):
    train(tiny_cfg(work, *OPTIONS, "ema.enabled=False"))
    return losses(work)


def test_prompt_lists_are_checked_before_anything_loads(tmp_path):
    import pytest

    from pgv25.engine.runner import Trainer
    from pgv25.errors import UserError
    from pgv25.generate import prompt_specs

    specs = prompt_specs(["a", {"prompt": "b", "seed": 4, "guidance_scale": 5.0}], {"seed": 1, "width": 64, "height": 64}, "k")
    assert (specs[0].seed, specs[1].seed, specs[1].guidance_scale, specs[1].width) == (1, 4, 5.0, 64)
    for bad, message in (([{"seed": 1}], "non-empty 'prompt'"), ([{"prompt": "x", "size": 3}], "unknown key"),
                         ([{"prompt": "x", "width": 100}], "multiple of 8")):
        with pytest.raises(UserError, match=message):
            prompt_specs(bad, {}, "validation.prompts")
    cfg = tiny_cfg(tmp_path)
    cfg.validation.prompts = [dict(prompt="x", height=-8)]
    with pytest.raises(UserError, match=r"validation.prompts\[0\].height"):
        Trainer(cfg)


def test_model_card_names_a_hub_base_and_its_license():
    from pgv25.engine.model_card import Card, render

    card = render(Card(title="t", base_model="playgroundai/playground-v2.5-1024px-aesthetic", playground=True, kind="lora",
                       iteration=10, settings={"objective": "x"}, instance_prompt="a photo of TOK dog"))
    assert "base_model: playgroundai/playground-v2.5-1024px-aesthetic" in card and "instance_prompt: a photo of TOK dog" in card
    assert "license_name: playground-v2dot5-community" in card and "load_lora_weights" in card and "- lora" in card
    mine = render(Card(title="t", base_model="org/sdxl", playground=False, kind="pipeline", iteration=1, license="mit"))
    assert "license: mit" in mine and "playground" not in mine.split("---")[1]
