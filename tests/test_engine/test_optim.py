"""Optimizer choice: Adafactor, 8-bit AdamW, Prodigy, Lion, CAME and schedule-free AdamW train and resume exactly;
a schedule-free run exports its average; unknown types and a missing or too old package fail in one line."""

import sys
import types

import pytest
import torch
from safetensors.torch import load_file
from torch.utils._pytree import tree_leaves

from conftest import straight_and_resumed, tiny_cfg
from pgv25.engine.optim import PACKAGED, build_optimizer
from pgv25.errors import UserError

RESUMABLE = ("sample_grid.prompts=[]", "default_hooks.checkpoint.interval=2")


def params():
    return [torch.nn.Parameter(torch.zeros(3, 3))]


def test_unsupported_choices_are_one_clear_error():
    with pytest.raises(UserError, match="'SGD' is not supported; choose one of AdamW, Adafactor, AdamW8bit, Prodigy, Lion, CAME, "
                                        "AdamWScheduleFree"):
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


@pytest.mark.parametrize("kind, package", [("Prodigy", "prodigyopt"), ("Lion", "lion_pytorch"), ("CAME", "came_pytorch"),
                                           ("AdamWScheduleFree", "schedulefree")])
def test_a_missing_optimizer_package_is_one_line_naming_the_extra(kind, package, monkeypatch):
    monkeypatch.setitem(sys.modules, package, None)  # an import of it fails, as when it is not installed
    with pytest.raises(UserError, match=rf"optimizer {kind} needs .*: pip install \"pgv25\[.*\]\""):
        build_optimizer(params(), {"type": kind, "lr": 0.1}, on_cuda=False)


def test_inherited_adamw_keys_that_do_not_fit_are_dropped_with_a_warning(caplog):
    pytest.importorskip("came_pytorch")
    came = build_optimizer(params(), {"type": "CAME", "lr": 1e-4, "betas": [0.9, 0.999], "eps": 1e-8}, on_cuda=False)
    assert came.defaults["betas"] == (0.9, 0.999, 0.9999) and "inherited betas (0.9, 0.999) is ignored" in caplog.text
    pytest.importorskip("prodigyopt")
    build_optimizer(params(), {"type": "Prodigy", "lr": 1e-5}, on_cuda=False)
    assert "its lr is a multiplier, usually 1.0" in caplog.text
    with pytest.raises(UserError, match=r"optim_wrapper.optimizer \(Lion\)"):  # lion-pytorch checks with assert
        build_optimizer(params(), {"type": "Lion", "lr": -1.0}, on_cuda=False)


def test_eval_weights_swaps_in_the_average_and_puts_the_training_weights_back_bit_for_bit():
    schedulefree = pytest.importorskip("schedulefree")
    from pgv25.engine.optim import eval_weights

    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(64, 64))
    optimizer = build_optimizer([weight], {"type": "AdamWScheduleFree", "lr": 0.01}, on_cuda=False)
    assert isinstance(optimizer, schedulefree.AdamWScheduleFree)
    for _ in range(5):
        (weight ** 2).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    training = weight.detach().clone()
    z = optimizer.state[weight]["z"]
    with eval_weights(optimizer, [weight]):
        assert torch.equal(weight.detach(), training.lerp(z, 1 - 1 / 0.9))  # schedulefree's own eval(): x from y and z
    assert torch.equal(weight.detach(), training) and optimizer.param_groups[0]["train_mode"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["Adafactor", "AdamW8bit", "Prodigy", "Lion", "CAME", "AdamWScheduleFree"])
def test_trains_and_resumes_exactly(kind, tiny_assets, tmp_path):
    if kind == "AdamW8bit":
        pytest.importorskip("bitsandbytes", minversion="0.50")
    elif kind in PACKAGED:
        pytest.importorskip(PACKAGED[kind][0])
    lr = {"Prodigy": 1.0, "Lion": 1e-4}.get(kind)  # Prodigy's lr multiplies its own estimate; Lion's steps are sign-sized
    options = ("train_cfg.max_iters=4", f"optim_wrapper.optimizer.type={kind}", *RESUMABLE,
               *([f"optim_wrapper.optimizer.lr={lr}"] if lr else []))
    straight = tmp_path / "straight"
    before, a, b = straight_and_resumed(tmp_path, *options)
    assert any(not torch.equal(a[k], before[k]) for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # every tensor of the nested state (bitsandbytes keeps its 8-bit moments one level down)
    state = torch.load(straight / "checkpoints" / "iter_0000002" / "optimizer.pt", weights_only=True)
    moments = [t for t in tree_leaves(state) if torch.is_tensor(t) and t.dim() > 0]
    assert moments and any(t.dtype == torch.uint8 for t in moments) == (kind == "AdamW8bit")
    exported = load_file(straight / "step4" / "unet" / "diffusion_pytorch_model.safetensors")
    if kind == "AdamWScheduleFree":  # the export holds the average x = y + (1 − 1/β₁)(z − y), not the training weights y
        state = torch.load(straight / "checkpoints" / "iter_0000004" / "optimizer.pt", weights_only=True)["state"]
        assert all(torch.equal(exported[k], a[k].lerp(state[k]["z"], 1 - 1 / 0.9)) for k in a)
        assert any(not torch.equal(exported[k], a[k]) for k in a)
    else:
        assert all(torch.equal(exported[k], a[k]) for k in a)
