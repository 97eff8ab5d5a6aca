"""A Playground v2.5-shaped base pipeline with random weights, built without the hub.

    python tools/build_fullsize_base.py DIR                          # fp16, on the GPU when there is one
    python tools/build_fullsize_base.py DIR --dtype bf16 --device cpu --bpe bpe_simple_vocab_16e6.txt.gz

What it writes is a pipeline folder that `pgv25 train` (model.pretrained_model_name_or_path=DIR),
`pgv25 generate` and plain diffusers load like playgroundai/playground-v2.5-1024px-aesthetic:

- unet: the published config (pgv25/models/playground_configs.py), 2,567,463,684 parameters;
- vae: SDXL's AutoencoderKL with Playground's latents_mean/latents_std and scaling factor 0.5;
- text_encoder / text_encoder_2: CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 text towers of the real sizes;
- tokenizer / tokenizer_2: CLIP's real BPE vocabulary (49,408 tokens), made here from the
  `bpe_simple_vocab_16e6.txt.gz` that open-clip-torch ships (`pip install --no-deps open-clip-torch`,
  or --bpe FILE); tokenizer_2 pads with "!" as SDXL's second tokenizer does;
- scheduler: EDMDPMSolverMultistepScheduler with Playground's settings.

Weights are initialised by the models' own initialisers on --device (seconds on a GPU, about a minute
on a CPU), one component at a time so the fp32 UNet (10 GB) is the largest thing in memory, and saved
in --dtype. The numbers are random: the folder is for checking shapes, memory, speed and the whole
train → checkpoint → resume → export → generate path at full size, not for images worth looking at.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pgv25.models import playground_configs  # noqa: E402
from pgv25.tiny.base_pipeline import PLAYGROUND_SCHEDULER_CONFIG, bytes_to_unicode, write_bpe_files  # noqa: E402

CLIP_MERGES = 49152 - 256 - 2  # CLIP uses the first 48,894 merges of the file: 49,408 tokens in all
CLIP_VOCAB_SIZE = 49408
BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
MODEL_INDEX = {
    "_class_name": "StableDiffusionXLPipeline", "_diffusers_version": "0.42.1", "force_zeros_for_empty_prompt": True,
    "add_watermarker": None, "feature_extractor": [None, None], "image_encoder": [None, None],
    "scheduler": ["diffusers", "EDMDPMSolverMultistepScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"], "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def find_bpe_file(given: str | None) -> Path:
    """The BPE merge list: --bpe, else the copy inside an installed open_clip package (found, not imported)."""
    if given:
        path = Path(given).expanduser()
        if not path.is_file():
            raise SystemExit(f"--bpe {given}: no such file")
        return path
    spec = importlib.util.find_spec("open_clip")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / BPE_FILE).is_file():
            return Path(folder) / BPE_FILE
    raise SystemExit(f"CLIP's BPE vocabulary ({BPE_FILE}) not found: `pip install --no-deps open-clip-torch` "
                     "(it ships the file), or pass --bpe FILE")


def clip_vocabulary(bpe_file: Path, max_merges: int = CLIP_MERGES) -> tuple[dict[str, int], list[str]]:
    """CLIP's vocab.json and merges from its BPE file, in OpenAI's order: the 256 byte symbols, the same
    with `</w>`, one token per merge, then `<|startoftext|>` and `<|endoftext|>`."""
    lines = gzip.open(bpe_file, "rt", encoding="utf-8").read().split("\n")
    merges = [line for line in lines[1:] if line.strip()][:max_merges]  # line 0 is the version header
    bad = next((m for m in merges if len(m.split()) != 2), None)
    if bad is not None:
        raise SystemExit(f"{bpe_file}: not a BPE merge list (line {bad!r} is not two symbols)")
    alphabet = list(bytes_to_unicode().values())
    tokens = alphabet + [a + "</w>" for a in alphabet] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(tokens)}, merges


def build_tokenizers(vocab: dict[str, int], merges: list[str]):
    """(tokenizer, tokenizer_2) as in SDXL: the same vocabulary; the second pads with "!" (id 0)."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        vocab_file, merges_file = write_bpe_files(Path(tmp), vocab, merges)
        first = CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=77)
        second = CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=77, pad_token="!")
    return first, second


def component_builders(configs: dict) -> dict:
    """name → a function that builds that component with the models' own random initialisation."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    return {
        "unet": lambda: UNet2DConditionModel.from_config(configs["unet"]),
        "vae": lambda: AutoencoderKL.from_config(configs["vae"]),
        "text_encoder": lambda: CLIPTextModel(CLIPTextConfig(**configs["text_encoder"])),
        "text_encoder_2": lambda: CLIPTextModelWithProjection(CLIPTextConfig(**configs["text_encoder_2"])),
    }


PLAYGROUND = {"unet": playground_configs.UNET, "vae": playground_configs.VAE,
              "text_encoder": playground_configs.TEXT_ENCODER, "text_encoder_2": playground_configs.TEXT_ENCODER_2}


def reduced_configs(width: int = 32) -> dict:
    """Playground's configs with every width cut down (same blocks, same conditioning layout, CLIP's
    vocabulary): for trying the full-size tools on a CPU in seconds."""
    text = {"hidden_size": width, "intermediate_size": 2 * width, "num_hidden_layers": 2, "num_attention_heads": 4,
            "projection_dim": width}
    time_dim = 8
    unet = {**playground_configs.UNET, "block_out_channels": [width, 2 * width, 4 * width], "attention_head_dim": [2, 4, 8],
            "layers_per_block": 1, "transformer_layers_per_block": [1, 1, 2], "cross_attention_dim": 2 * width,
            "addition_time_embed_dim": time_dim, "projection_class_embeddings_input_dim": 6 * time_dim + width,
            "sample_size": 32}
    vae = {**playground_configs.VAE, "block_out_channels": [width] * 4, "layers_per_block": 1, "sample_size": 256}
    return {"unet": unet, "vae": vae, "text_encoder": {**playground_configs.TEXT_ENCODER, **text},
            "text_encoder_2": {**playground_configs.TEXT_ENCODER_2, **text}}


def build_base(folder: Path, tokenizers, dtype: str = "fp16", device: str = "cpu", seed: int = 0,
               configs: dict | None = None) -> dict:
    """Write the pipeline folder; returns parameter counts and seconds per component."""
    from diffusers import EDMDPMSolverMultistepScheduler

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    report = {"parameters": {}, "seconds": {}}
    torch.manual_seed(seed)
    for name, build in component_builders(configs or PLAYGROUND).items():  # one at a time: the fp32 UNet alone is 10 GB
        start = time.time()
        with torch.device(device):  # initialise where it is fast; save_pretrained copies to the host
            model = build().to(DTYPES[dtype]).eval()
        model.save_pretrained(folder / name)
        report["parameters"][name] = sum(p.numel() for p in model.parameters())
        report["seconds"][name] = round(time.time() - start, 1)
        del model
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    EDMDPMSolverMultistepScheduler(**PLAYGROUND_SCHEDULER_CONFIG).save_pretrained(folder / "scheduler")
    for name, tokenizer in zip(("tokenizer", "tokenizer_2"), tokenizers):
        tokenizer.save_pretrained(folder / name)
    (folder / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2))
    report["bytes"] = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder")
    p.add_argument("--dtype", choices=("fp16", "bf16"), default="fp16")
    p.add_argument("--device", default=None, help="where weights are initialised (default: cuda when available)")
    p.add_argument("--bpe", help=f"CLIP's {BPE_FILE} (default: the one in an installed open_clip package)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    folder = Path(args.folder)
    if folder.exists() and any(folder.iterdir()):
        raise SystemExit(f"{folder} exists and is not empty; give a new folder")
    vocab, merges = clip_vocabulary(find_bpe_file(args.bpe))
    if len(vocab) != CLIP_VOCAB_SIZE:
        raise SystemExit(f"the BPE file gives {len(vocab)} tokens, not CLIP's {CLIP_VOCAB_SIZE}: is it CLIP's {BPE_FILE}?")
    start = time.time()
    report = build_base(folder, build_tokenizers(vocab, merges), args.dtype, device, args.seed)
    report.update(folder=str(folder), dtype=args.dtype, device=device, vocab=len(vocab), total_seconds=round(time.time() - start, 1))
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
