"""tools/build_fullsize_base.py: Playground's full-size configs (counted on the meta device), CLIP's
vocabulary built from a BPE merge file, and a reduced-width base that diffusers loads as an SDXL pipeline."""

import gzip
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

import build_fullsize_base as builder  # noqa: E402


def bpe_file(path: Path, merges: list[str]) -> Path:
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(["bpe_simple_vocab_16e6.txt#version: 0.2", *merges, ""]))
    return path


def test_full_size_components_have_playgrounds_parameter_counts():
    with torch.device("meta"):  # shapes only: no memory, no time
        parts = {name: build() for name, build in builder.component_builders(builder.PLAYGROUND).items()}
    counts = {name: sum(p.numel() for p in model.parameters()) for name, model in parts.items()}
    assert counts == {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840}


def test_clip_vocabulary_order_and_bad_files(tmp_path):
    vocab, merges = builder.clip_vocabulary(bpe_file(tmp_path / "bpe.gz", ["c a", "ca t</w>", "d o", "do g</w>"]), max_merges=3)
    assert merges == ["c a", "ca t</w>", "d o"]  # the first max_merges lines after the header
    assert len(vocab) == 512 + 3 + 2
    assert vocab["!"] == 0 and vocab["!</w>"] == 256  # bytes, then bytes ending a word
    assert [vocab["ca"], vocab["cat</w>"], vocab["do"]] == [512, 513, 514]
    assert vocab["<|startoftext|>"] == 515 and vocab["<|endoftext|>"] == 516
    first, second = builder.build_tokenizers(vocab, merges)
    assert first("cat").input_ids == [515, 513, 516]
    assert second.pad_token == "!" and second.pad_token_id == 0 and first.pad_token == "<|endoftext|>"
    with pytest.raises(SystemExit, match="not a BPE merge list"):
        builder.clip_vocabulary(bpe_file(tmp_path / "bad.gz", ["c a b"]))
    with pytest.raises(SystemExit, match="no such file"):
        builder.find_bpe_file(str(tmp_path / "missing.gz"))


@pytest.mark.skipif(importlib.util.find_spec("open_clip") is None, reason="open-clip-torch (the real BPE file) not installed")
def test_real_clip_vocabulary_gives_clips_token_ids():
    vocab, merges = builder.clip_vocabulary(builder.find_bpe_file(None))
    assert len(vocab) == builder.CLIP_VOCAB_SIZE
    first, _ = builder.build_tokenizers(vocab, merges)
    assert first("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]  # OpenAI CLIP's ids


def test_reduced_base_loads_as_a_playground_shaped_sdxl_pipeline(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    vocab, merges = builder.clip_vocabulary(bpe_file(tmp_path / "bpe.gz", ["c a", "ca t</w>", "d o", "do g</w>"]))
    configs = builder.reduced_configs()
    report = builder.build_base(tmp_path / "base", builder.build_tokenizers(vocab, merges), "bf16", "cpu", configs=configs)
    pipe = StableDiffusionXLPipeline.from_pretrained(tmp_path / "base", torch_dtype=torch.bfloat16)
    assert type(pipe.scheduler).__name__ == "EDMDPMSolverMultistepScheduler"
    assert pipe.unet.dtype == torch.bfloat16 and sum(p.numel() for p in pipe.unet.parameters()) == report["parameters"]["unet"]
    assert list(pipe.vae.config.latents_mean) == builder.PLAYGROUND["vae"]["latents_mean"]
    assert pipe.vae.config.scaling_factor == 0.5
    unet = builder.PLAYGROUND["unet"]
    for key in ("down_block_types", "up_block_types", "addition_embed_type", "use_linear_projection"):
        assert pipe.unet.config[key] == unet[key]
    assert pipe.tokenizer_2.pad_token == "!" and len(pipe.tokenizer) == len(vocab)
    image = pipe("a cat", num_inference_steps=2, height=64, width=64, output_type="np").images[0]
    assert image.shape == (64, 64, 3)
