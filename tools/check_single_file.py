"""The single-file export at full size, read back by diffusers' own loader (CPU, no download; not in CI).

    python tools/check_single_file.py --work /tmp/single_file_check            # build, write, load, compare
    python tools/check_single_file.py --work /tmp/single_file_check --keep     # keep the 7 GB of files afterwards

1. A Playground v2.5-shaped pipeline folder with random weights in fp16: the published UNet, VAE and
   text-encoder configs (pgv25/models/playground_configs.py), the EDM DPM++ scheduler, and the tiny
   default's tokenizers (their vocabulary does not matter to a weight comparison).
2. `pgv25 export single-file` of that folder (fp16).
3. `StableDiffusionXLPipeline.from_single_file(FILE, config=FOLDER)`: diffusers' own detection (it must
   say playground-v2-5), its LDM→diffusers converters, its CLIP routing.
4. Every tensor of every component compared with the folder's, bit for bit; edm_mean/edm_std against the
   VAE config. Prints one JSON line with the counts, the sizes and the seconds each step took.

Peak memory is about 16 GB (the file's state dict and the loaded pipeline, both fp16).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from pgv25.models import playground_configs  # noqa: E402


def build_folder(folder: Path, tokenizers_from: Path, seed: int) -> None:
    from transformers import CLIPTokenizer

    from build_fullsize_base import build_base

    tokenizers = [CLIPTokenizer.from_pretrained(tokenizers_from / name) for name in ("tokenizer", "tokenizer_2")]
    build_base(folder, tokenizers, "fp16", "cpu", seed)


def compare(pipe, folder: Path) -> dict[str, int]:
    from pgv25.engine.single_file import read_component

    counts = {}
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        loaded = getattr(pipe, name).state_dict()
        saved = read_component(folder / name, torch.float16)
        missing = sorted(set(saved) - set(loaded))
        differ = [k for k in saved if k in loaded and not torch.equal(loaded[k].to(torch.float16), saved[k])]
        if missing or differ:
            raise SystemExit(f"{name}: {len(missing)} weights missing ({missing[:3]}), {len(differ)} differ ({differ[:3]})")
        counts[name] = len(saved)
    return counts


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/tmp/single_file_check")
    p.add_argument("--tokenizers", help="a pipeline folder to take the tokenizers from (default: the tiny default's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", action="store_true")
    args = p.parse_args()

    from diffusers import StableDiffusionXLPipeline
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type, load_single_file_checkpoint

    from pgv25.engine.single_file import write_single_file

    work = Path(args.work)
    folder, out = work / "fullsize_random", work / "fullsize_random.safetensors"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    if args.tokenizers:
        tokenizers = Path(args.tokenizers)
    else:
        from pgv25.config import load_config
        from pgv25.tiny import ensure_tiny_assets

        assets = load_config("playgroundv2_5_tiny_shapes").tiny_assets  # the embedded default's, cached once built
        ensure_tiny_assets(**assets)
        tokenizers = Path(assets.root).expanduser() / "playground-v2.5-tiny"
    seconds = {}
    start = time.time()
    build_folder(folder, tokenizers, args.seed)
    seconds["build"] = round(time.time() - start, 1)
    start = time.time()
    write_single_file(folder, out, "fp16", title="full-size random-weight check")
    seconds["write"] = round(time.time() - start, 1)
    start = time.time()
    model_type = infer_diffusers_model_type(load_single_file_checkpoint(str(out), local_files_only=True))
    pipe = StableDiffusionXLPipeline.from_single_file(str(out), config=str(folder), torch_dtype=torch.float16,
                                                      local_files_only=True)
    seconds["load"] = round(time.time() - start, 1)
    start = time.time()
    counts = compare(pipe, folder)
    seconds["compare"] = round(time.time() - start, 1)
    stats = pipe.vae.config
    vae = playground_configs.VAE
    result = {
        "diffusers_model_type": model_type, "weights_equal": counts, "file_gib": round(out.stat().st_size / 2**30, 2),
        "unet_parameters": sum(p.numel() for p in pipe.unet.parameters()),
        "latents_mean_ok": list(stats.latents_mean) == vae["latents_mean"], "latents_std_ok": list(stats.latents_std) == vae["latents_std"],
        "scheduler": type(pipe.scheduler).__name__, "seconds": seconds,
    }
    print(json.dumps(result))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if model_type == "playground-v2-5" and result["latents_mean_ok"] and result["latents_std_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
