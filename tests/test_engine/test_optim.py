"""Optimizer choice: Adafactor trains and resumes exactly; AdamW8bit and unknown types fail in one line."""

import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_cfg
from pgv25.engine.optim import build_optimizer
from pgv25.engine.runner import train
from pgv25.errors import UserError

ADAFACTOR = ("optim_wrapper.optimizer.type=Adafactor", "sample_grid.prompts=[]", "default_hooks.checkpoint.interval=2")


def params():
    return [torch.nn.Parameter(torch.zeros(3, 3))]


def test_unsupported_choices_are_one_clear_error():
    with pytest.raises(UserError, match="'SGD' is not supported; choose one of AdamW, Adafactor, AdamW8bit"):
        build_optimizer(params(), {"type": "SGD", "lr": 0.1}, use_fused=False)
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="AdamW8bit needs a CUDA GPU"):
            build_optimizer(params(), {"type": "AdamW8bit", "lr": 0.1}, use_fused=False)
    with pytest.raises(UserError, match=r"optim_wrapper.optimizer \(AdamW\): Invalid learning rate"):
        build_optimizer(params(), {"type": "AdamW", "lr": -1.0}, use_fused=False)


def test_keys_of_another_optimizer_are_dropped_with_a_warning(caplog):
    optimizer = build_optimizer(params(), {"type": "Adafactor", "lr": 0.01, "betas": [0.9, 0.999], "eps": 1e-8}, use_fused=False)
    assert isinstance(optimizer, torch.optim.Adafactor)
    assert "takes no betas: ignored" in caplog.text and "the scalar eps 1e-08 is ignored" in caplog.text


def test_adafactor_trains_and_resumes_exactly(tiny_assets, tmp_path):
    straight = tmp_path / "straight"
    train(tiny_cfg(straight, "train_cfg.max_iters=4", *ADAFACTOR))
    resumed = tmp_path / "resumed"
    shutil.copytree(straight / "checkpoints" / "iter_0000002", resumed / "checkpoints" / "iter_0000002")
    train(tiny_cfg(resumed, "train_cfg.max_iters=4", *ADAFACTOR), resume=True)
    a = load_file(straight / "checkpoints" / "iter_0000004" / "model.safetensors")
    b = load_file(resumed / "checkpoints" / "iter_0000004" / "model.safetensors")
    before = load_file(straight / "checkpoints" / "iter_0000002" / "model.safetensors")
    assert any(not torch.equal(a[k], before[k]) for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
