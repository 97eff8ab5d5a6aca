"""The memory planner: optimizer state by each optimizer's real layout, every measured full-size peak predicted
within 10%, the levers it proposes, `pgv25 plan` and the start-of-run warning."""

import importlib.util
import logging
import math
import sys
import types
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import TINY_OPTIONS, tiny_cfg

from pgv25.engine import plan
from pgv25.engine.optim import build_optimizer
from pgv25.engine.options import read_options

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))
import plan_check

SHAPES = [(320, 640, 3, 3), (1280, 2048), (640,), (4096, 7), (12,)]  # a conv, a linear, a bias, bnb's size limit, tiny
INSTALLED = [kind for kind, module in [("AdamW", "torch"), ("Adafactor", "torch"), ("AdamW8bit", "bitsandbytes"),
                                      ("Prodigy", "prodigyopt"), ("Lion", "lion_pytorch"), ("CAME", "came_pytorch"),
                                      ("AdamWScheduleFree", "schedulefree")] if importlib.util.find_spec(module)]


@pytest.fixture(scope="module")
def playground():
    return plan_check.playground_shapes()


@pytest.mark.parametrize("kind", INSTALLED)
def test_optimizer_state_bytes_match_the_optimizers_own_state(kind):
    """The planner's layout of each optimizer's state equals what the optimizer allocates at its first step."""
    params = [torch.nn.Parameter(torch.randn(shape)) for shape in SHAPES]
    optimizer = build_optimizer(params, {"type": kind, "lr": 1.0 if kind == "Prodigy" else 1e-4}, on_cuda=False)
    if hasattr(optimizer, "train"):  # schedule-free optimizers step in train mode only
        optimizer.train()
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    allocated = sum(v.numel() * v.element_size() for state in optimizer.state.values() for v in state.values()
                    if torch.is_tensor(v) and v.dim() > 0)  # scalars (step counts) are not counted
    assert plan.optimizer_state_bytes(kind, SHAPES) == allocated


def test_an_unknown_optimizer_is_one_line():
    with pytest.raises(plan.UserError, match="optimizer 'SGD' is unknown to the planner; choose one of: AdamW, Adafactor"):
        plan.optimizer_state_bytes("SGD", SHAPES)


def test_playground_shapes_from_the_published_configs(playground):
    assert playground.unet_params == 2_567_463_684 and len(playground.unet) == 1680
    assert playground.largest == 29_491_200
    assert plan.optimizer_state_bytes("Adafactor", playground.unet) == 4 * 244_330_500  # the checkpoint's 0.91 GiB
    assert playground.text_encoders == 123_060_480 + 694_659_840 and playground.vae == 83_653_863
    assert playground.lora_params(16, ("to_q", "to_k", "to_v", "to_out.0")) == 16 * 1_451_520


def test_every_measured_peak_is_predicted_within_10_percent():
    """docs/perf_runs/memory_peaks.json: GPU peaks allocated and CPU peaks resident, each with its setup. 10%: the
    measured peaks themselves move by a few percent between runs of one setup (the resumed CPU run 5% above the
    first), and the activation coefficients are fitted to a handful of rows."""
    rows = plan_check.compared()
    assert len(rows) >= 12 and {row["setup"].get("device", "cuda") for row in rows} == {"cuda", "cpu"}
    wrong = [f"{row['name']}: measured {row['measured_gib']}, predicted {row['predicted_gib']}" for row in rows
             if abs(row["error"]) > 0.10]
    assert not wrong, wrong


def test_the_parts_add_up_as_the_levers_say(playground):
    full = plan.Setup(lora_rank=None, batch=1)
    fp32 = plan.predict(playground, full)
    bf16 = plan.predict(playground, replace(full, trained_dtype="bf16"))
    fused = plan.predict(playground, replace(full, trained_dtype="bf16", fused_backward=True, optimizer="Adafactor"))
    gib = playground.unet_params / plan.GIB
    assert math.isclose(fp32.trained_weights, 4 * gib) and math.isclose(bf16.trained_weights, 2 * gib)
    assert math.isclose(fp32.optimizer_state, 8 * gib) and math.isclose(bf16.optimizer_state, 8 * gib)  # fp32 moments
    assert fused.gradients < 0.06 and fp32.gradients == pytest.approx(4 * gib)  # one tensor's gradient at a time
    assert bf16.weight_copies == 0 < fp32.weight_copies  # bf16 weights need no autocast copies
    checkpointed = plan.predict(playground, replace(full, checkpointing=True))
    assert checkpointed.weight_copies == 0 and checkpointed.activations < fp32.activations / 10
    # activations scale with the bucket's pixels and the batch; fp32 compute doubles them
    half = plan.predict(playground, replace(full, pixels=512 * 1024, batch=2))
    assert half.activations == pytest.approx(fp32.activations)
    assert plan.predict(playground, replace(full, mixed_precision="no")).activations == pytest.approx(2 * fp32.activations)
    # FSDP shards weights, gradients and state over the processes; DDP adds its gradient buckets
    fsdp = plan.predict(playground, replace(full, processes=4, strategy="fsdp"))
    assert fsdp.optimizer_state == pytest.approx(fp32.optimizer_state / 4)
    ddp = plan.predict(playground, replace(full, processes=4))
    assert ddp.update_transient == pytest.approx(fp32.gradients)
    cached = plan.predict(playground, replace(full, cached=False))
    assert cached.encoders == pytest.approx((playground.text_encoders * 2 + playground.vae * 4) / plan.GIB)


def test_what_fits_a_16_gib_card_is_the_bf16_fused_full_fine_tune(playground):
    base = plan.Setup(lora_rank=None, batch=1)
    fitting = plan.ranked(playground, base, 16, effective_batch=1)
    assert fitting and all(plan.fits(p, 16) for _, p in fitting)
    best, _ = fitting[0]
    assert not best.checkpointing  # the fastest first: no recompute where something fits without it
    assert best.optimizer in ("Adafactor", "AdamW8bit") and best.fused_backward
    assert not plan.ranked(playground, base, 6, effective_batch=1)  # 4.8 GiB of bf16 weights alone, and the context
    # more memory: a larger batch, the rest by accumulation; the update inside backward never accumulates
    roomy = plan.ranked(playground, base, 80, effective_batch=16)
    assert max(s.batch for s, _ in roomy) > 1
    assert all(s.batch * s.accumulation >= 16 and (s.accumulation == 1 or not s.fused_backward) for s, _ in roomy)
    assert not any(s.fused_backward for s, _ in plan.ranked(playground, replace(base, processes=2), 80, 16))
    # under FSDP only what it takes: fp32 weights, AdamW or Adafactor, no update inside backward
    sharded = plan.ranked(playground, replace(base, processes=8, strategy="fsdp"), 24, 16)
    assert sharded and all(s.trained_dtype == "fp32" and s.optimizer in ("AdamW", "Adafactor") and not s.fused_backward
                           for s, _ in sharded)


def test_pgv25_plan_prints_the_parts_and_what_fits(tiny_assets, capsys):
    from pgv25.cli import main

    config = REPO / "configs" / "playground_v2_5" / "playgroundv2_5_tiny_shapes.py"
    assert main(["plan", str(config), "--gpu-memory", "0.5", "24", "--cfg-options", *TINY_OPTIONS]) == 0
    out = capsys.readouterr().out
    assert "trained weights" in out and "optimizer state" in out and "peak while training" in out
    assert "On 0.5 GiB per GPU" in out and "On 24 GiB per GPU" in out and "LoRA, the fastest that fit first" in out
    assert "--cfg-options train_dataloader.batch_size=" in out
    assert main(["plan", str(config), "--device", "cpu", "--gpu-memory", "4", "--cfg-options", *TINY_OPTIONS]) == 0
    assert "peak while the UNet loads" in capsys.readouterr().out


def test_playground_is_planned_offline_and_another_hub_model_is_one_line(capsys, monkeypatch):
    from pgv25.cli import main
    from pgv25.models import loading

    monkeypatch.setattr(loading, "hub_reachable", lambda timeout=3.0: False)
    assert main(["plan", "playgroundv2_5_lora_pokemon_blip", "--gpu-memory", "24"]) == 0
    out = capsys.readouterr().out
    assert "LoRA rank 32" in out and "UNet 2,567,463,684 parameters" in out
    assert main(["plan", "playgroundv2_5_pokemon_blip", "--cfg-options",
                 "model.pretrained_model_name_or_path=someone/some-sdxl-model"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot reach the Hugging Face Hub" in err and "--local-dir" in err


def test_a_gpu_run_whose_plan_exceeds_the_card_warns_once(tiny_assets, tmp_path, monkeypatch, caplog):
    options = read_options(tiny_cfg(tmp_path))
    card = types.SimpleNamespace(total_memory=64 * 2**20)  # a 64 MiB card: the tiny UNet's AdamW run does not fit
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: card)
    with caplog.at_level(logging.WARNING, logger="pgv25"):
        plan.warn_if_too_large(options, 1)
    assert len(caplog.records) == 1 and "exceeds this card's 0.1 GiB: `pgv25 plan" in caplog.text
    card.total_memory = 80 * 2**30
    caplog.clear()
    plan.warn_if_too_large(options, 1)
    assert not caplog.records
