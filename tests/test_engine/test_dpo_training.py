"""DPO through `pgv25 train`: LoRA (reference = adapters off) and full (reference = a frozen copy), exact resume, exports."""

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_cfg
from pgv25.engine.runner import train

DPO = "playgroundv2_5_dpo_tiny_shapes"
SMALL = ["train_dataloader.batch_size=3", "sample_grid.prompts=[]", "optim_wrapper.optimizer.lr=1e-3"]


def scalars(work) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in ("images_per_s", "loader_wait")}
            for line in (Path(work) / "scalars.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def lora_dpo(tmp_path_factory, tiny_assets):
    work = tmp_path_factory.mktemp("lora_dpo")
    cfg = tiny_cfg(work, *SMALL, "model.lora.enabled=True", "model.lora.rank=4", "train_cfg.max_iters=4",
                   "default_hooks.checkpoint.interval=2", "ema.enabled=True", config=DPO)
    return work, train(cfg)


def test_lora_dpo_logs_pair_metrics_starting_from_ties(lora_dpo):
    work, result = lora_dpo
    rows = scalars(work)
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4]
    # LoRA starts at B = 0: the policy is the reference, every pair a tie, the loss log 2
    assert rows[0]["dpo/implicit_accuracy"] == 0.5 and rows[0]["dpo/reward_margin"] == 0.0
    assert abs(rows[0]["loss"] - 0.693147) < 1e-5
    assert any(r["dpo/reward_margin"] != 0.0 for r in rows[1:]), "the policy never moved away from the reference"
    for row in rows:
        assert 0.0 <= row["dpo/implicit_accuracy"] <= 1.0
        assert any(k.startswith("dpo/policy_error_sigma/") for k in row) and any(k.startswith("dpo/reference_error_sigma/") for k in row)
    assert (result.step_dir / "pytorch_lora_weights.safetensors").is_file()


def test_lora_dpo_resume_is_exact(lora_dpo, tmp_path):
    work, result = lora_dpo
    cfg = tiny_cfg(tmp_path, *SMALL, "model.lora.enabled=True", "model.lora.rank=4", "train_cfg.max_iters=4",
                   "default_hooks.checkpoint.interval=2", "ema.enabled=True", config=DPO)
    resumed = train(cfg, resume=str(work / "checkpoints" / "iter_0000002"))
    a = load_file(resumed.step_dir / "pytorch_lora_weights.safetensors")
    b = load_file(result.step_dir / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert scalars(tmp_path) == scalars(work)[2:]


def test_the_exported_dpo_lora_loads_in_plain_diffusers(lora_dpo, tiny_pipeline):
    import copy

    _, result = lora_dpo
    pipe = copy.deepcopy(tiny_pipeline)
    pipe.load_lora_weights(str(result.step_dir))
    image = pipe("a red circle on a white background", num_inference_steps=3, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (64, 64, 3)


def test_full_dpo_from_the_latent_cache_trains_the_unet_against_a_frozen_copy(tiny_assets, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="pgv25")
    cfg = tiny_cfg(tmp_path, *SMALL, "train_cfg.max_iters=2", "default_hooks.checkpoint.interval=2",
                   "train_dataloader.dataset.cache.enabled=True", config=DPO)  # pairs from the latent cache
    result = train(cfg)
    rows = scalars(tmp_path)
    assert rows[0]["dpo/implicit_accuracy"] == 0.5  # the copy equals the policy before the first update
    base = load_file(tiny_assets["model"] / "unet" / "diffusion_pytorch_model.safetensors")
    trained = load_file(result.step_dir / "unet" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(base[k], trained[k]) for k in base)
    assert (result.step_dir / "model_index.json").is_file()
    assert "objective DPO (β 5000, λ epsilon, reference a frozen copy of the base UNet)" in caplog.text
    # the 336 pairs encoded once, by this run or by an earlier test with the same data
    assert "latent cache of 336 pairs" in caplog.text or "VAE and text encoders not loaded" in caplog.text
