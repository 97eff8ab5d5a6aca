"""EMA: the update rule and its warm-up, checkpointing, exact resume, and which weights an export holds."""

import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_cfg
from pgv25.engine.ema import EMA, build_ema
from pgv25.engine.runner import train
from pgv25.errors import UserError


def one_weight(value: float) -> torch.nn.Module:
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(value)
    return model


def test_update_rule_every_and_update_after():
    model = one_weight(0.0)
    ema = EMA(model, decay=0.75, warmup=False, update_after=1, every=2)
    with torch.no_grad():
        model.weight.fill_(4.0)
    ema.update(1)  # not past update_after
    ema.update(3)  # not a multiple of every
    assert ema.state()["weight"].item() == 0.0 and ema.updates == 0
    ema.update(2)
    assert ema.state()["weight"].item() == pytest.approx(1.0)  # 0.75·0 + 0.25·4
    ema.update(4)
    assert ema.state()["weight"].item() == pytest.approx(1.75)  # 0.75·1 + 0.25·4
    assert ema.updates == 2


def test_warmup_starts_from_the_weights_and_ramps_towards_the_cap():
    ema = EMA(one_weight(1.0), decay=0.999, warmup=True, power=2 / 3)
    decays = []
    for n in range(4):
        ema.updates = n
        decays.append(ema.current_decay())
    assert decays[0] == 0.0  # the first update copies the weights
    assert decays == sorted(decays) and decays[3] == pytest.approx(1 - 4 ** (-2 / 3))
    ema.updates = 10**9
    assert ema.current_decay() == 0.999


def test_bad_options_and_mismatched_weights_are_clear_errors():
    with pytest.raises(UserError, match="ema: ema.decay must be in"):
        build_ema(one_weight(0.0), {"enabled": True, "decay": 1.5})
    with pytest.raises(UserError, match="ema: .*unexpected keyword"):
        build_ema(one_weight(0.0), {"enabled": True, "decya": 0.9})
    assert build_ema(one_weight(0.0), {"enabled": False}) is None
    with pytest.raises(ValueError, match="do not match"):
        EMA(one_weight(0.0)).load_state({"other": torch.zeros(1, 1)}, 3)


EMA_ON = ("ema.enabled=True", "ema.decay=0.5", "ema.warmup=False", "sample_grid.prompts=[]",
          "default_hooks.checkpoint.interval=2")


@pytest.fixture(scope="module")
def ema_run(tiny_assets, tmp_path_factory):
    work = tmp_path_factory.mktemp("ema")
    train(tiny_cfg(work, "train_cfg.max_iters=4", *EMA_ON))
    return work


def unet_of(step_dir):
    return load_file(step_dir / "unet" / "diffusion_pytorch_model.safetensors")


def test_checkpoints_hold_the_ema_and_exports_use_it(ema_run):
    checkpoint = ema_run / "checkpoints" / "iter_0000004"
    model, ema = load_file(checkpoint / "model.safetensors"), load_file(checkpoint / "ema.safetensors")
    assert set(ema) == set(model)
    assert any(not torch.equal(ema[k], model[k]) for k in ema)
    exported = unet_of(ema_run / "step4")
    assert all(torch.equal(exported[k], ema[k]) for k in ema)


def test_model_weights_can_be_exported_instead(tiny_assets, tmp_path):
    train(tiny_cfg(tmp_path, "train_cfg.max_iters=2", *EMA_ON, "ema.export=model"))
    model = load_file(tmp_path / "checkpoints" / "iter_0000002" / "model.safetensors")
    exported = unet_of(tmp_path / "step2")
    assert all(torch.equal(exported[k], model[k]) for k in model)
    with pytest.raises(UserError, match="ema.export must be"):
        train(tiny_cfg(tmp_path / "bad", "train_cfg.max_iters=2", *EMA_ON, "ema.export=both"))


def test_resume_continues_the_ema_exactly(ema_run, tmp_path):
    shutil.copytree(ema_run / "checkpoints" / "iter_0000002", tmp_path / "checkpoints" / "iter_0000002")
    train(tiny_cfg(tmp_path, "train_cfg.max_iters=4", *EMA_ON), resume=True)
    a = load_file(ema_run / "checkpoints" / "iter_0000004" / "ema.safetensors")
    b = load_file(tmp_path / "checkpoints" / "iter_0000004" / "ema.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ema_switched_on_at_resume_starts_from_the_resumed_weights(tiny_assets, tmp_path):
    train(tiny_cfg(tmp_path, "train_cfg.max_iters=2", "sample_grid.prompts=[]", "default_hooks.checkpoint.interval=2"))
    assert not (tmp_path / "checkpoints" / "iter_0000002" / "ema.safetensors").exists()
    train(tiny_cfg(tmp_path, "train_cfg.max_iters=3", *EMA_ON), resume=True)
    assert (tmp_path / "checkpoints" / "iter_0000003" / "ema.safetensors").is_file()
