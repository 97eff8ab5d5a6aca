"""Generation's speed levers: which `pgv25 generate` turns on where, and that with all of them (compiled blocks
included) the tiny pipeline draws the same images as the plain one."""

import numpy as np
import pytest

from pgv25.generate import apply_speed_levers, generate, load_pipeline, speed_levers


def test_levers_by_device_and_flags():
    assert speed_levers("cuda") == ["fused_qkv", "channels_last", "cudnn_attention"]
    assert speed_levers("cuda:1", compile_blocks=True)[-1] == "compile"
    assert speed_levers("cpu") == [] and speed_levers("cpu", compile_blocks=True) == ["compile"]
    assert speed_levers("cuda", eager=True) == []
    # a LoRA's update of q, k, v would be lost in a projection fused from the base weights
    assert "fused_qkv" not in speed_levers("cuda", lora=True) and "channels_last" in speed_levers("cuda", lora=True)


def test_levers_draw_the_same_images(tiny_assets):
    def images(levers):
        pipe = load_pipeline(tiny_assets["model"], device="cpu")
        apply_speed_levers(pipe, levers, compile_options={"backend": "eager"})  # the traced graphs, without a C++ build
        drawn = generate(pipe, ["a red circle", "a blue square on a white background"], steps=4)
        return np.stack([np.asarray(image, dtype=np.int16) for image in drawn]), pipe

    plain, _ = images([])
    fast, pipe = images(["fused_qkv", "channels_last", "cudnn_attention", "compile"])
    assert pipe.unet.conv_in.weight.is_contiguous(memory_format=__import__("torch").channels_last)
    assert any(getattr(m, "_compiled_call_impl", None) is not None for m in pipe.unet.modules())
    # fp32 throughout: fusing q, k, v into one matmul only reorders sums (~1e-6 relative); a pixel may round
    # to the neighbouring 8-bit value, never further
    assert np.abs(fast - plain).max() <= 1


def test_unknown_lever():
    with pytest.raises(ValueError, match="unknown speed levers"):
        apply_speed_levers(object(), ["fastest"])


@pytest.mark.slow
def test_a_failed_compile_is_one_line(tiny_assets, tmp_path, monkeypatch):
    import torch._inductor.config as inductor

    from test_cli import call, one_line_error

    monkeypatch.setattr(inductor.cpp, "cxx", (None, "/bin/false"))  # a machine whose C++ compiler does not work
    result = call("generate", "--model", str(tiny_assets["model"]), "--prompt", "a red circle", "--steps", "1",
                  "--out", str(tmp_path / "o.png"), "--compile")
    one_line_error(result, "--compile failed", "run without --compile")
