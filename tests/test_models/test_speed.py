"""The speed switches on a CPU: each computes the same function as the plain path, and the compiled blocks
trace without graph breaks and within the recompile limit over all SDXL buckets."""

import pytest
import torch

from pgv25.models.speed import compile_unet, on_device
from pgv25.errors import UserError
from pgv25.models.speed import ATTENTION_BACKENDS, attention_backend, compile_regions, low_precision_norms
from pgv25.tiny.base_pipeline import build_unet

CPU = torch.device("cpu")


def unet_inputs(unet, batch: int, height: int, width: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    config = unet.config
    pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    return dict(
        sample=torch.randn(batch, 4, height, width, generator=g),
        timestep=torch.tensor([10.0] * batch),
        encoder_hidden_states=torch.randn(batch, 77, config.cross_attention_dim, generator=g),
        added_cond_kwargs={"text_embeds": torch.randn(batch, pooled, generator=g),
                           "time_ids": torch.tensor([[8.0 * height, 8.0 * width, 0, 0, 8.0 * height, 8.0 * width]] * batch)},
    )


def test_low_precision_norms_same_state_and_function():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 32, 3, padding=1), torch.nn.GroupNorm(8, 32), torch.nn.SiLU(),
                                torch.nn.Flatten(2), torch.nn.LayerNorm(16))
    x = torch.randn(2, 4, 4, 4)
    before, keys = model(x), list(model.state_dict())
    assert low_precision_norms(model) == 2
    assert list(model.state_dict()) == keys
    assert torch.equal(model(x), before)  # outside autocast: the fp32 norms, bit for bit
    with torch.autocast("cpu", torch.bfloat16):
        low = model(x)
    assert low.dtype == torch.bfloat16
    # bf16 output rounding: relative 2^-8 per element, well under 1e-2 in norm
    assert (low.float() - before).norm() / before.norm() < 1e-2


@pytest.mark.parametrize("name", ATTENTION_BACKENDS)
def test_attention_backend_computes_the_same_attention(name):
    q, k, v = (torch.randn(2, 4, 16, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    plain = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    with attention_backend(name):  # the CUDA kernels cannot run here: the next in order does
        chosen = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert (chosen - plain).abs().max() < 1e-5
    with pytest.raises(ValueError, match="attention backend"):
        attention_backend("fastest")


def test_speed_switch_values():
    cuda = torch.device("cuda")
    assert on_device("cuda", cuda, "k") and not on_device("cuda", CPU, "k")
    assert on_device(True, CPU, "k") and not on_device(False, cuda, "k") and not on_device(None, cuda, "k")
    with pytest.raises(UserError, match="model.channels_last must be True, False or 'cuda'"):
        on_device("gpu", CPU, "model.channels_last")


def test_compile_unet_regions_and_whole(caplog):
    torch.manual_seed(0)
    unet = build_unet(16)
    inputs = unet_inputs(unet, 1, 16, 16)
    expected = unet(**inputs).sample
    compile_unet(unet, {"enabled": "cuda", "regions": ["transformer"]}, buckets=1, device=CPU)
    assert not any(hasattr(m, "_compiled_call_impl") and m._compiled_call_impl for m in unet.modules())  # 'cuda' on a CPU
    compile_unet(unet, {"enabled": True, "regions": ["transformer", "resnet"], "backend": "eager"}, buckets=1, device=CPU)
    compiled = [type(m).__name__ for m in unet.modules() if getattr(m, "_compiled_call_impl", None) is not None]
    assert set(compiled) == {"BasicTransformerBlock", "ResnetBlock2D"}
    assert torch.allclose(unet(**inputs).sample, expected, atol=1e-6)
    sharded = build_unet(16)  # the GPU default is not applied under FSDP; an explicit True is
    compile_unet(sharded, {"enabled": "cuda", "regions": None}, buckets=1, device=torch.device("cuda"), sharded=True)
    assert sharded._compiled_call_impl is None
    whole = build_unet(16)
    compile_unet(whole, {"enabled": True, "regions": None, "backend": "eager"}, buckets=1, device=CPU)
    assert whole._compiled_call_impl is not None
    with pytest.raises(UserError, match="model.compile.regions: unknown block kind 'attention'"):
        compile_unet(build_unet(16), {"enabled": True, "regions": ["attention"]}, buckets=1, device=CPU)
    with pytest.raises(ValueError, match="no \\['ResnetBlock2D'\\]"):
        compile_regions(torch.nn.Linear(2, 2), ["resnet"])


@pytest.mark.slow
def test_regional_compile_over_the_sdxl_buckets_without_graph_breaks():
    """Compile readiness: every SDXL bucket at 1024 (17 shapes) through forward and backward of the compiled
    blocks, fullgraph (a graph break is an error), with the recompile limit compile_unet sets and a hit of it
    an error; the number of graphs is what one per block kind, width and shape allows."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from pgv25.data.buckets import make_buckets

    buckets = make_buckets(1024)
    assert len(buckets) == 17
    torch.manual_seed(0)
    unet = build_unet(32).train()
    torch._dynamo.reset()
    counters.clear()
    limit = torch._dynamo.config.cache_size_limit
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        try:
            # 'eager' backend: dynamo's capture and guards as in training, without generating kernels
            compile_unet(unet, {"enabled": True, "regions": ["transformer"], "backend": "eager", "fullgraph": True,
                                "dynamic": False}, buckets=len(buckets), device=CPU)
            for width, height in buckets:  # pixels → the tiny VAE's latents (÷8 of the 1024 buckets, ÷4 again for time)
                out = unet(**unet_inputs(unet, 1, height // 32, width // 32)).sample
                out.square().mean().backward()
        finally:
            torch._dynamo.config.cache_size_limit = limit
    graphs = counters["stats"]["unique_graphs"]
    widths = len({m.norm1.normalized_shape for m in unet.modules() if type(m).__name__ == "BasicTransformerBlock"})
    assert 0 < graphs <= len(buckets) * widths  # one per shape and width; a recompile per call would exceed this
    assert not counters["graph_break"]
