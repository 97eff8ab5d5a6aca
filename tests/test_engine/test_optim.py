"""Optimizer choice: Adafactor and 8-bit AdamW train and resume exactly; unknown types and a missing or too
old bitsandbytes fail in one line."""

import shutil
import sys
import types

import pytest
import torch
from safetensors.torch import load_file
from torch.utils._pytree import tree_leaves

from conftest import tiny_cfg
from pgv25.engine.optim import build_optimizer
from pgv25.engine.runner import train
from pgv25.errors import UserError

RESUMABLE = ("sample_grid.prompts=[]", "default_hooks.checkpoint.interval=2")


def params():
    return [torch.nn.Parameter(torch.zeros(3, 3))]


def test_unsupported_choices_are_one_clear_error():
    with pytest.raises(UserError, match="'SGD' is not supported; choose one of AdamW, Adafactor, AdamW8bit"):
        build_optimizer(params(), {"type": "SGD", "lr": 0.1}, on_cuda=False)
    with pytest.raises(UserError, match=r"optim_wrapper.optimizer \(AdamW\): Invalid learning rate"):
        build_optimizer(params(), {"type": "AdamW", "lr": -1.0}, on_cuda=False)


def test_keys_of_another_optimizer_are_dropped_with_a_warning(caplog):
    optimizer = build_optimizer(params(), {"type": "Adafactor", "lr": 0.01, "betas": [0.9, 0.999], "eps": 1e-8}, on_cuda=False)
    assert isinstance(optimizer, torch.optim.Adafactor)
    assert "takes no betas: ignored" in caplog.text and "the scalar eps 1e-08 is ignored" in caplog.text


def test_adamw8bit_needs_bitsandbytes_and_off_cuda_a_recent_one(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # an import of it fails, as when it is not installed
    with pytest.raises(UserError, match="AdamW8bit needs bitsandbytes: pip install bitsandbytes"):
        build_optimizer(params(), {"type": "AdamW8bit", "lr": 0.1}, on_cuda=False)
    monkeypatch.setitem(sys.modules, "bitsandbytes", types.SimpleNamespace(__version__="0.49.2", optim=None))
    with pytest.raises(UserError, match=r"without a CUDA GPU needs bitsandbytes >= 0.50 \(this is 0.49.2\)"):
        build_optimizer(params(), {"type": "AdamW8bit", "lr": 0.1}, on_cuda=False)


def test_adamw8bit_with_fsdp_over_processes_is_refused_before_loading(monkeypatch, tmp_path):
    """bitsandbytes' kernels cannot update FSDP's sharded parameters: one line at start-up, not a traceback at step 1."""
    from pgv25.engine import build
    from pgv25.engine.options import read_options

    monkeypatch.setattr(build.Runtime, "world_size", property(lambda self: 2))
    with pytest.raises(UserError, match="optimizer AdamW8bit with strategy='fsdp' is not supported"):
        build.build_runtime(read_options(tiny_cfg(tmp_path, "strategy=fsdp", "optim_wrapper.optimizer.type=AdamW8bit")), tmp_path, [])
    assert build.build_runtime(read_options(tiny_cfg(tmp_path, "strategy=ddp", "optim_wrapper.optimizer.type=AdamW8bit")), tmp_path, [])


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["Adafactor", "AdamW8bit"])
def test_trains_and_resumes_exactly(kind, tiny_assets, tmp_path):
    if kind == "AdamW8bit":
        pytest.importorskip("bitsandbytes", minversion="0.50")
    options = ("train_cfg.max_iters=4", f"optim_wrapper.optimizer.type={kind}", *RESUMABLE)
    straight = tmp_path / "straight"
    train(tiny_cfg(straight, *options))
    resumed = tmp_path / "resumed"
    shutil.copytree(straight / "checkpoints" / "iter_0000002", resumed / "checkpoints" / "iter_0000002")
    train(tiny_cfg(resumed, *options), resume=True)
    a = load_file(straight / "checkpoints" / "iter_0000004" / "model.safetensors")
    b = load_file(resumed / "checkpoints" / "iter_0000004" / "model.safetensors")
    before = load_file(straight / "checkpoints" / "iter_0000002" / "model.safetensors")
    assert any(not torch.equal(a[k], before[k]) for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # every tensor of the nested state (bitsandbytes keeps its 8-bit moments one level down)
    state = torch.load(straight / "checkpoints" / "iter_0000002" / "optimizer.pt", weights_only=True)
    moments = [t for t in tree_leaves(state) if torch.is_tensor(t) and t.dim() > 0]
    assert moments and any(t.dtype == torch.uint8 for t in moments) == (kind == "AdamW8bit")
