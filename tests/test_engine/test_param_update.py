"""bf16 trained weights with stochastic rounding, and the update inside backward (engine/param_update.py): rounding
is unbiased, the fused update equals the ordinary one, a bf16 + stochastic rounding + fused run resumes bit for bit,
and what they cannot do is refused in one line."""

import pytest
import torch
from safetensors.torch import load_file
from torch.utils._pytree import tree_leaves

from conftest import straight_and_resumed, tiny_cfg
from pgv25.engine.ema import EMA
from pgv25.engine.options import read_options
from pgv25.engine.param_update import ParamUpdates, keep_fp32_state_on_load, stochastic_round
from pgv25.engine.runner import Trainer
from pgv25.errors import UserError

RESUMABLE = ("sample_grid.prompts=[]", "default_hooks.checkpoint.interval=2")
BF16 = ("model.trained_dtype=bf16",)
FUSED = ("optim_wrapper.fused_backward=True", "optim_wrapper.clip_grad=None")
SPACING = 2.0 ** -7  # bf16's spacing on [1, 2): 8 bits of significand (7 stored)


def test_stochastic_rounding_is_unbiased_where_nearest_loses_the_update():
    generator = torch.Generator().manual_seed(0)
    n = 200_000
    for value in (1.0 + SPACING / 8, -(1.0 + 3 * SPACING / 8), 1.5 + SPACING / 2):
        x = torch.full((n,), value, dtype=torch.float32)
        rounded = stochastic_round(x, generator)
        assert rounded.dtype == torch.bfloat16
        below = torch.tensor(value).to(torch.bfloat16).float()  # may be the value above for a negative one
        assert set(rounded.float().unique().tolist()) <= {float(below), float(below) + SPACING, float(below) - SPACING}
        # the mean of n Bernoulli(p)·spacing draws: standard error spacing·√(p(1−p)/n) ≤ 0.5·spacing/√n ≈ 8.7e-6;
        # 6 standard errors
        assert abs(rounded.double().mean().item() - value) < 6 * 0.5 * SPACING / n ** 0.5
    exact = torch.tensor([1.0, -2.5, 0.0, 3.140625], dtype=torch.float32)  # values bf16 holds: never moved
    assert torch.equal(stochastic_round(exact, generator).float(), exact)


def test_many_small_updates_survive_stochastic_rounding_and_vanish_with_nearest():
    generator = torch.Generator().manual_seed(1)
    update, steps = SPACING / 16, 400  # each a sixteenth of the spacing: round-to-nearest drops every one
    stochastic = torch.ones(4096, dtype=torch.bfloat16)
    nearest = torch.ones(4096, dtype=torch.bfloat16)
    for _ in range(steps):
        stochastic = stochastic_round(stochastic.float() + update, generator)
        nearest = (nearest.float() + update).to(torch.bfloat16)
    assert torch.equal(nearest, torch.ones_like(nearest))
    expected = 1.0 + steps * update  # 1.1953125
    # each element is a sum of 400 unbiased roundings (variance ≤ spacing²/4 each, ~2x at the next binade):
    # the mean over 4,096 elements has a standard error < 1e-4
    assert abs(stochastic.double().mean().item() - expected) < 1e-3


def small_model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4)).to(dtype)


@pytest.mark.parametrize("kind", ["AdamW", "Adafactor"])
def test_the_update_inside_backward_equals_the_ordinary_step(kind):
    make = {"AdamW": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.01),
            "Adafactor": lambda p: torch.optim.Adafactor(p, lr=1e-2)}[kind]
    ordinary, fused = small_model(), small_model()
    opt_a, opt_b = make(list(ordinary.parameters())), make(list(fused.parameters()))
    updates = ParamUpdates(opt_b, list(fused.parameters()), None, None)
    updates.fuse_into_backward()
    data = torch.Generator().manual_seed(2)
    for _ in range(3):
        x, y = torch.randn(32, 8, generator=data), torch.randn(32, 4, generator=data)
        torch.nn.functional.mse_loss(ordinary(x), y).backward()
        expected_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in ordinary.parameters()]))
        opt_a.step()
        opt_a.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(fused(x), y).backward()
        norm, bad = updates.take_counts()
        assert all(p.grad is None for p in fused.parameters())  # freed as soon as used
        assert int(bad) == 0
        # the norm is summed in another order than torch's: float32 rounding apart, the same
        torch.testing.assert_close(norm, expected_norm, rtol=1e-5, atol=0)
    # per parameter the optimizer does the same arithmetic whether it steps one tensor or all: equal to fp32 rounding
    for a, b in zip(ordinary.parameters(), fused.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert opt_a.state_dict()["state"].keys() == opt_b.state_dict()["state"].keys()


def test_bf16_weights_step_in_fp32_keep_fp32_state_and_reload_it_unrounded():
    model = small_model(dtype=torch.bfloat16)
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    updates = ParamUpdates(optimizer, params, "stochastic", torch.Generator().manual_seed(0))
    x = torch.randn(16, 8).to(torch.bfloat16)
    model(x).square().mean().backward()
    before = [p.detach().clone() for p in params]
    updates.step()
    assert all(p.dtype == torch.bfloat16 for p in params)
    assert any(not torch.equal(a, p) for a, p in zip(before, params))
    moments = [t for t in tree_leaves(optimizer.state_dict()["state"]) if torch.is_tensor(t) and t.dim() > 0]
    assert moments and all(t.dtype == torch.float32 for t in moments)
    saved = optimizer.state_dict()
    fresh = torch.optim.AdamW(params, lr=1e-3)
    keep_fp32_state_on_load(fresh)
    fresh.load_state_dict(saved)  # torch's own load would cast the moments to the weights' bf16
    for p in params:
        for key in ("exp_avg", "exp_avg_sq"):
            assert fresh.state[p][key].dtype == torch.float32
            assert torch.equal(fresh.state[p][key], optimizer.state[p][key])


@pytest.mark.parametrize("fused", [False, True])
def test_each_parameter_is_updated_once_per_step_after_its_groups_are_replaced(fused):
    model = small_model(dtype=torch.bfloat16)
    params = list(model.parameters())
    optimizer = torch.optim.SGD(params, lr=0.1)
    updates = ParamUpdates(optimizer, params, "nearest", None)
    if fused:
        updates.fuse_into_backward()
    optimizer.load_state_dict(optimizer.state_dict())  # new group dicts, as accelerate's prepare and every resume make
    grads = {}
    for p in params:
        p.register_hook(lambda grad, p=p: grads.__setitem__(p, grad.clone()) or grad)
    before = [p.detach().clone() for p in params]
    model(torch.randn(4, 8).to(torch.bfloat16)).sum().backward()
    if not fused:
        updates.step()
    for p, old in zip(params, before):  # one SGD update in fp32, rounded to nearest: not two, not none
        assert torch.equal(p, (old.float() - 0.1 * grads[p].float()).to(torch.bfloat16))


def test_a_non_finite_gradient_inside_backward_is_zeroed_and_counted():
    model = small_model()
    params = list(model.parameters())
    optimizer = torch.optim.SGD(params, lr=0.1)
    updates = ParamUpdates(optimizer, params, None, None)
    updates.fuse_into_backward()
    before = [p.detach().clone() for p in params]
    poisoned = params[0]
    poisoned.register_hook(lambda grad: grad * float("nan"))  # runs before the post-accumulate hook
    model(torch.randn(4, 8)).sum().backward()
    norm, bad = updates.take_counts()
    assert int(bad) == 1 and torch.isfinite(norm)
    assert torch.equal(poisoned, before[0])  # SGD with a zero gradient: unchanged
    assert all(torch.isfinite(p).all() for p in params)
    assert not torch.equal(params[2], before[2])  # the others were updated


def test_ema_of_bf16_weights_is_kept_in_fp32():
    model = small_model(dtype=torch.bfloat16)
    ema = EMA(model, decay=0.5, warmup=False)
    assert all(s.dtype == torch.float32 for s in ema.shadow)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(1)
    assert all(s.dtype == torch.float32 for s in ema.shadow)


@pytest.mark.parametrize("options, message", [
    (("model.lora.enabled=True", *BF16), r"model.trained_dtype applies to a full fine-tune.*frozen_dtype='bf16'"),
    ((*BF16, "optim_wrapper.optimizer.type=Prodigy"), r"one parameter at a time, and optimizer Prodigy"),
    ((*FUSED, "optim_wrapper.optimizer.type=AdamWScheduleFree"), r"AdamWScheduleFree's step spans"),
    ((*BF16, "strategy=fsdp"), r"strategy='fsdp' is not supported"),
    ((*BF16, "optim_wrapper.mixed_precision=fp16"), r"computes in bf16: set optim_wrapper.mixed_precision='bf16'"),
    ((*FUSED, "optim_wrapper.accumulative_counts=2"), r"set accumulative_counts=1"),
    (("optim_wrapper.fused_backward=True", "optim_wrapper.clip_grad.max_norm=1.0"), r"cannot clip their global norm"),
    ((*FUSED, "optim_wrapper.mixed_precision=fp16"), r"fused_backward with mixed_precision='fp16'"),
    (("model.trained_dtype=fp16",), r"model.trained_dtype must be 'fp32' or 'bf16'"),
    (("model.frozen_dtype=int8",), r"model.frozen_dtype must be 'auto' or one of"),
    ((*BF16, "optim_wrapper.rounding=down"), r"optim_wrapper.rounding must be one of stochastic, nearest"),
    (("optim_wrapper.fused_backward=yes",), r"fused_backward must be True or False"),
])
def test_what_bf16_weights_and_fused_backward_cannot_do_is_one_line(tmp_path, options, message):
    with pytest.raises(UserError, match=message) as error:
        read_options(tiny_cfg(tmp_path, *options))
    assert "\n" not in str(error.value)


@pytest.mark.slow
@pytest.mark.parametrize("kind, fused", [("Adafactor", True), ("AdamW8bit", False)])
def test_bf16_stochastic_rounding_trains_and_resumes_bit_for_bit(kind, fused, tiny_assets, tmp_path):
    if kind == "AdamW8bit":  # its own load_state_dict casts state to the weights' dtype too: kept fp32 all the same
        pytest.importorskip("bitsandbytes", minversion="0.50")
    options = ("train_cfg.max_iters=4", *BF16, *(FUSED if fused else ()), f"optim_wrapper.optimizer.type={kind}",
               "ema.enabled=True", *RESUMABLE)
    straight = tmp_path / "straight"
    before, a, b = straight_and_resumed(tmp_path, *options)
    assert all(v.dtype == torch.bfloat16 for v in a.values())  # checkpoints hold the bf16 weights: half the bytes
    assert any(not torch.equal(a[k], before[k]) for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    rng = torch.load(straight / "checkpoints" / "iter_0000002" / "rng.pt", weights_only=True)
    assert "rounding" in rng["ranks"][0]
    # the export is written at export.dtype (fp32 by default), the EMA from its fp32 shadow
    exported = load_file(straight / "step4" / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(v.dtype == torch.float32 for v in exported.values())


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["AdamW", "Adafactor"])
def test_a_fused_backward_run_trains_as_an_ordinary_one(kind, tiny_assets, tmp_path):
    options = ("train_cfg.max_iters=3", f"optim_wrapper.optimizer.type={kind}", "sample_grid.prompts=[]",
               "optim_wrapper.clip_grad=None")
    ordinary = Trainer(tiny_cfg(tmp_path / "ordinary", *options))
    fused = Trainer(tiny_cfg(tmp_path / "fused", *options, *FUSED))
    for _ in range(3):
        a, b = ordinary.step(), fused.step()
        ordinary.iteration += 1
        fused.iteration += 1
        torch.testing.assert_close(a.loss, b.loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.grad_norm.float(), b.grad_norm.float(), rtol=1e-4, atol=1e-6)
    # three updates of the same arithmetic; float32 accumulation order inside the UNet's backward may differ
    for p, q in zip(ordinary.optim.trained_params, fused.optim.trained_params):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)
    ordinary.release()
    fused.release()


@pytest.mark.slow
def test_lora_over_a_bf16_frozen_base_trains_fp32_adapters_and_fuses_onto_the_stored_base(tiny_assets, tmp_path):
    from diffusers import UNet2DConditionModel

    options = ("train_cfg.max_iters=2", "model.lora.enabled=True", "model.lora.rank=4", "model.frozen_dtype=bf16",
               "model.lora.fuse_export=True", "sample_grid.prompts=[]")
    trainer = Trainer(tiny_cfg(tmp_path, *options))
    frozen = [p for p in trainer.unet.parameters() if not p.requires_grad]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    assert trainer.optim.trained_params and all(p.dtype == torch.float32 for p in trainer.optim.trained_params)
    assert trainer.optim.updates.rounding is None  # fp32 adapters: the optimizer steps them as usual
    result = trainer.run()
    lora = load_file(result.step_dir / "pytorch_lora_weights.safetensors")
    assert lora and all(v.dtype == torch.float32 for v in lora.values())
    fused = UNet2DConditionModel.from_pretrained(result.step_dir.with_name(f"{result.step_dir.name}_fused"), subfolder="unet")
    base = UNet2DConditionModel.from_pretrained(tiny_assets["model"], subfolder="unet")
    # a layer without an adapter is the stored fp32 base exactly, not its bf16 copy in memory
    name = "conv_in.weight"
    assert torch.equal(fused.state_dict()[name], base.state_dict()[name])
    assert not torch.equal(base.state_dict()[name], base.state_dict()[name].to(torch.bfloat16).float())


@pytest.mark.slow
def test_a_non_finite_loss_with_fused_backward_is_caught_before_any_weight_moves(tiny_assets, tmp_path, caplog):
    trainer = Trainer(tiny_cfg(tmp_path, "train_cfg.max_iters=3", *BF16, *FUSED, "sample_grid.prompts=[]",
                               "default_hooks.checkpoint.interval=100", "param_scheduler.warmup_iters=0"))  # lr > 0 at once
    encode = trainer.codec.encode
    trainer.codec.encode = lambda pixels, generator: encode(pixels, generator) * (float("nan") if trainer.iteration == 1 else 1.0)
    before = [p.detach().clone() for p in trainer.optim.trained_params]
    first = trainer.step()
    trainer.iteration += 1
    after_first = [p.detach().clone() for p in trainer.optim.trained_params]
    assert not first.nonfinite and any(not torch.equal(a, b) for a, b in zip(before, after_first))
    poisoned = trainer.step()  # iteration 2: NaN latents, so a NaN loss
    assert poisoned.nonfinite and poisoned.zeroed == 0
    assert all(torch.equal(a, p) for a, p in zip(after_first, trainer.optim.trained_params))  # nothing moved
    assert all(p.grad is None for p in trainer.optim.trained_params)
    trainer.release()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["Adafactor", "AdamW"])
def test_resuming_a_fused_backward_run_holds_one_gradient_at_a_time(kind, tiny_assets, tmp_path, monkeypatch):
    """torch's state-dict loader would give every parameter a zero gradient at once to make the optimizer's state: a
    full set of gradients, which a run updating inside backward never holds. The state is made one parameter at a
    time instead, and the resume stays bit for bit."""
    from pgv25.engine import resume

    options = ("train_cfg.max_iters=4", *BF16, *FUSED, f"optim_wrapper.optimizer.type={kind}", *RESUMABLE)
    prepare, gradients, complete = resume.prepare_for_loading, [], []

    def watched(optimizer):
        params = [p for group in optimizer.param_groups for p in group["params"]]
        step = optimizer.step

        def counted(*args, **kwargs):  # the gradients that exist whenever the optimizer steps
            gradients.append(sum(p.grad is not None for p in params))
            return step(*args, **kwargs)

        optimizer.step = counted
        try:
            prepare(optimizer)
        finally:
            del optimizer.step
        complete.append(all(optimizer.state.get(p) for p in params))  # torch's loader then makes none of its own

    monkeypatch.setattr(resume, "prepare_for_loading", watched)
    before, a, b = straight_and_resumed(tmp_path, *options)
    assert complete == [True] and gradients and max(gradients) == 1
    assert all(torch.equal(a[k], b[k]) for k in a)
