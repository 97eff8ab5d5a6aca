"""model.float8: torchao's float8 linear layers in the transformer blocks; emulated on a CPU, the path trains, its loss
stays near the plain one, checkpoints and exports keep the plain UNet's names; what it cannot do is one line."""

import pytest
import torch

from conftest import tiny_cfg
from pgv25.engine.options import read_options
from pgv25.engine.runner import Trainer
from pgv25.errors import UserError
from pgv25.models.float8 import enable_float8, float8_setting

pytest.importorskip("torchao")


def test_the_setting_and_what_a_cpu_cannot_do_are_one_line():
    assert float8_setting(False) is None and float8_setting(True) == "native" and float8_setting("emulate") == "emulate"
    with pytest.raises(UserError, match=r"model.float8 must be False, True .* or 'emulate'"):
        float8_setting("fp8")
    with pytest.raises(UserError, match="needs float8 tensor cores .* a CPU has none: set model.float8=False, or 'emulate'"):
        enable_float8(torch.nn.Linear(16, 16), "native", torch.device("cpu"))


def test_float8_with_lora_or_fsdp_is_refused_before_anything_loads(tmp_path):
    with pytest.raises(UserError, match="model.float8 applies to a full fine-tune"):
        read_options(tiny_cfg(tmp_path, "model.float8=emulate", "model.lora.enabled=True"))
    with pytest.raises(UserError, match="model.float8 with strategy='fsdp' is not supported"):
        read_options(tiny_cfg(tmp_path, "model.float8=emulate", "strategy=fsdp"))


@pytest.mark.slow
def test_emulated_float8_trains_near_the_plain_loss_and_exports_a_plain_unet(tiny_assets, tmp_path):
    from diffusers import UNet2DConditionModel

    options = ("train_cfg.max_iters=2", "sample_grid.prompts=[]", "default_hooks.checkpoint.interval=2")
    plain = Trainer(tiny_cfg(tmp_path / "plain", *options))
    fp8 = Trainer(tiny_cfg(tmp_path / "fp8", *options, "model.float8=emulate"))
    swapped = [n for n, m in fp8.unet.named_modules() if type(m).__name__ == "Float8Linear"]
    assert swapped and all(".transformer_blocks." in n for n in swapped)
    # not the projections of the 77 text tokens: float8's weight-gradient matmul needs batch × 77 a multiple of 16
    assert not [n for n in swapped if n.endswith(("attn2.to_k", "attn2.to_v"))]
    assert len(swapped) == 8 * sum(1 for n, _ in fp8.unet.named_modules() if n.endswith(".attn2.to_k"))
    # odd latent sizes in the lower blocks: the inner dimension padded to 16 with zeros instead of a cuBLAS error
    assert all(fp8.unet.get_submodule(n).config.pad_inner_dim for n in swapped)
    assert list(fp8.unet.state_dict()) == list(plain.unet.state_dict())  # the parameter names do not change
    a, b = plain.step(), fp8.step()
    # the same weights, batch, σ and noise: e4m3 keeps 3 mantissa bits (relative rounding up to 6%) on the inputs and
    # weights of 56 of the tiny UNet's matmuls, but the errors average out in the loss: measured 0.02–0.04% apart
    # (three seeds), held to 1%
    torch.testing.assert_close(b.loss, a.loss, rtol=0.01, atol=0)
    assert torch.isfinite(b.grad_norm) and b.grad_norm > 0
    plain.release()
    fp8.iteration += 1
    result = fp8.run()
    exported = UNet2DConditionModel.from_pretrained(result.step_dir, subfolder="unet")
    start = UNet2DConditionModel.from_pretrained(tiny_assets["model"], subfolder="unet")
    name = swapped[0] + ".weight"
    assert not torch.equal(exported.state_dict()[name], start.state_dict()[name])  # trained, saved under its own name
    assert (tmp_path / "fp8" / "checkpoints" / "iter_0000002" / "model.safetensors").is_file()
