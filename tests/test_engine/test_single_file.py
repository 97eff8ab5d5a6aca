"""The single-file export, read back by diffusers' own single-file converters (the direction diffusers ships).

At full size the key layout is checked on the meta device (names and shapes, no memory): the file's names are
what diffusers' converters and model-type detection expect of a Playground v2.5 checkpoint. At tiny size the
weights and an image are checked. diffusers' detection picks the tiny text_encoder_2 wrongly (see
test_tiny_round_trip_through_diffusers), so that one encoder goes through diffusers' OpenCLIP converter directly.
"""

from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from pgv25.engine.single_file import write_single_file
from pgv25.models import ldm_layout, playground_configs

OPEN_CLIP = "conditioner.embedders.1.model."


def meta_state(model_class, config: dict) -> dict:
    from accelerate import init_empty_weights

    with init_empty_weights():
        return model_class.from_config(config).state_dict()


def same_tensors(converted: dict, original: dict) -> None:
    assert set(converted) == set(original), sorted(set(converted) ^ set(original))[:6]
    bad = [k for k in original if converted[k].shape != original[k].shape]
    assert not bad, f"{bad[:3]}: shapes differ"


def test_full_size_unet_names_survive_diffusers_conversion():
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    state = meta_state(UNet2DConditionModel, playground_configs.UNET)
    ldm = ldm_layout.unet_to_ldm(state, playground_configs.UNET)
    # Landmarks of the original SDXL file (sgm's UNetModel): the layout is SDXL's, not only self-consistent.
    for key in ("input_blocks.3.0.op.weight", "input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight",
                "input_blocks.7.0.skip_connection.weight", "middle_block.1.transformer_blocks.9.ff.net.2.weight",
                "output_blocks.2.2.conv.weight", "output_blocks.5.2.conv.weight", "output_blocks.8.0.out_layers.3.weight",
                "label_emb.0.0.weight", "out.2.weight"):
        assert ldm_layout.UNET_PREFIX + key in ldm, key
    same_tensors(convert_ldm_unet_checkpoint(ldm, playground_configs.UNET), state)


def test_full_size_vae_and_text_encoder_names_survive_diffusers_conversion():
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint, convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    vae = meta_state(AutoencoderKL, playground_configs.VAE)
    ldm_vae = ldm_layout.vae_to_ldm(vae, playground_configs.VAE)
    assert ldm_vae["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)  # 1×1 conv in LDM
    assert "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight" in ldm_vae  # LDM counts decoder levels upwards
    same_tensors(convert_ldm_vae_checkpoint(ldm_vae, playground_configs.VAE), vae)

    from accelerate import init_empty_weights

    with init_empty_weights():
        encoder = CLIPTextModelWithProjection(CLIPTextConfig(**playground_configs.TEXT_ENCODER_2))
    clip_g = ldm_layout.clip_g_to_ldm(encoder.state_dict())
    assert clip_g[OPEN_CLIP + "transformer.resblocks.31.attn.in_proj_weight"].shape == (3840, 1280)
    back = convert_open_clip_checkpoint(encoder, clip_g, prefix=OPEN_CLIP)
    same_tensors(back, {k: v for k, v in encoder.state_dict().items() if not k.endswith("position_ids")})


def test_full_size_file_is_detected_as_playground_v2_5():
    """diffusers' model-type detection and CLIP routing on a file with the full-size names (and no weights)."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type, is_clip_sdxl_model, is_open_clip_sdxl_model
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from accelerate import init_empty_weights

    with init_empty_weights():
        clip_l = CLIPTextModel(CLIPTextConfig(**playground_configs.TEXT_ENCODER)).state_dict()
        clip_g = CLIPTextModelWithProjection(CLIPTextConfig(**playground_configs.TEXT_ENCODER_2)).state_dict()
    checkpoint = {**ldm_layout.unet_to_ldm(meta_state(UNet2DConditionModel, playground_configs.UNET), playground_configs.UNET),
                  **ldm_layout.clip_l_to_ldm(clip_l), **ldm_layout.clip_g_to_ldm(clip_g), "edm_mean": torch.zeros(1, 4, 1, 1),
                  "edm_std": torch.ones(1, 4, 1, 1)}
    assert infer_diffusers_model_type(checkpoint) == "playground-v2-5"
    assert is_clip_sdxl_model(checkpoint) and is_open_clip_sdxl_model(checkpoint)
    del checkpoint["edm_mean"], checkpoint["edm_std"]
    assert infer_diffusers_model_type(checkpoint) == "xl_base"  # without them it is plain SDXL


@pytest.fixture(scope="module")
def tiny_file(tiny_assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "tiny.safetensors"
    return write_single_file(tiny_assets["model"], out, "fp32", title="tiny test", run={"iteration": 7})


def test_file_holds_every_weight_once_with_edm_statistics_and_modelspec(tiny_file, tiny_pipeline):
    import json

    state = load_file(tiny_file)
    counts = sum(len(getattr(tiny_pipeline, name).state_dict()) for name in ("unet", "vae", "text_encoder", "text_encoder_2"))
    fused = 4 * tiny_pipeline.text_encoder_2.config.num_hidden_layers  # OpenCLIP keeps q/k/v as one in_proj weight and bias
    assert len(state) == counts - fused + 2  # nothing dropped or doubled; + edm_mean, edm_std
    vae = tiny_pipeline.vae.config
    assert state["edm_mean"].shape == (1, 4, 1, 1) and state["edm_mean"].dtype == torch.float32
    assert state["edm_mean"].flatten().tolist() == pytest.approx(vae.latents_mean, rel=1e-6)
    assert state["edm_std"].flatten().tolist() == pytest.approx(vae.latents_std, rel=1e-6)
    with safe_open(str(tiny_file), "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base" and meta["modelspec.title"] == "tiny test"
    assert meta["modelspec.license"] == "playground-v2dot5-community" and json.loads(meta["pgv25.iteration"]) == 7


def test_tiny_round_trip_through_diffusers(tiny_file, tiny_assets, tiny_pipeline):
    from diffusers import StableDiffusionXLPipeline
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextModelWithProjection

    base = str(tiny_assets["model"])
    checkpoint = load_file(tiny_file)
    # diffusers routes a CLIP to the first embedder whenever its width equals that embedder's; both tiny encoders
    # are 32 wide, so text_encoder_2 would get text_encoder's weights. At full size (768 vs 1280) it cannot.
    encoder_2 = CLIPTextModelWithProjection.from_pretrained(base, subfolder="text_encoder_2")
    encoder_2.load_state_dict(convert_open_clip_checkpoint(encoder_2, checkpoint, prefix=OPEN_CLIP), strict=True)
    pipe = StableDiffusionXLPipeline.from_single_file(str(tiny_file), config=base, text_encoder_2=encoder_2,
                                                      local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        ours, theirs = getattr(pipe, name).state_dict(), getattr(tiny_pipeline, name).state_dict()
        assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in theirs), name
    assert type(pipe.scheduler).__name__ == "EDMDPMSolverMultistepScheduler"

    def image(p):
        return p("a red circle on a white background", num_inference_steps=4, guidance_scale=3.0,
                 generator=torch.Generator().manual_seed(0), output_type="np").images

    assert abs(image(pipe) - image(tiny_pipeline)).max() == 0  # the same weights through the same code


def test_export_single_file_command(tiny_assets, tmp_path, capsys):
    from pgv25.cli import main

    def run(*args):
        capsys.readouterr()
        code = main(["export", "single-file", *args])
        return SimpleNamespace(returncode=code, stderr=capsys.readouterr().err)

    out = tmp_path / "half.safetensors"
    done = run(str(tiny_assets["model"]), "--out", str(out))
    assert done.returncode == 0, done.stderr
    state = load_file(out)
    assert state[ldm_layout.UNET_PREFIX + "out.2.weight"].dtype == torch.float16  # default fp16, what checkpoints ship as
    assert state["edm_mean"].dtype == torch.float32

    lora = tmp_path / "lora_export"
    lora.mkdir()
    (lora / "pytorch_lora_weights.safetensors").write_bytes(b"")
    bad = run(str(lora), "--out", str(tmp_path / "x.safetensors"))
    assert bad.returncode == 2 and "is a LoRA export" in bad.stderr and len(bad.stderr.splitlines()) == 1
    blocker = tmp_path / "a_file"  # a file where a folder should be: unwritable for root too
    blocker.write_text("")
    bad = run(str(tiny_assets["model"]), "--out", str(blocker / "x.safetensors"))
    assert bad.returncode == 2 and "cannot write" in bad.stderr and len(bad.stderr.splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "half.safetensors", "lora_export"]  # no leftovers
