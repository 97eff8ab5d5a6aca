"""Seconds per image: 50 steps of the EDM DPM++ sampler with classifier-free guidance, pgv25's generate
path vs a plain diffusers pipeline, eager and with the UNet compiled.

    python tools/bench_generate.py                                 # full-size Playground v2.5, 1024², GPU, fp16
    python tools/bench_generate.py --arch tiny --device cpu --size 64 --steps 4 --images 1   # a smoke run on CPU

The full-size pipeline is built from its configs with random weights (no download): the SDXL UNet of
bench_train.py, CLIP ViT-L and bigG text encoders and the SDXL VAE with Playground's latent
statistics; the tokenizers are the locally generated tiny ones (token ids do not change the cost).
Both paths share the same modules; "pgv25" runs `pgv25.generate.configure_pipeline` + `generate`
(what `pgv25 generate` does after loading), "diffusers" calls the pipeline as its docs show.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_train import PLAYGROUND_UNET, PLAYGROUND_SCHEDULER, device_name, sync  # noqa: E402

from pgv25.generate import apply_speed_levers, configure_pipeline, generate  # noqa: E402

CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768,
              max_position_embeddings=77, hidden_act="quick_gelu")
CLIP_BIG_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20, projection_dim=1280,
                  max_position_embeddings=77, hidden_act="gelu")
SDXL_VAE = dict(block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=4, layers_per_block=2, sample_size=1024,
                scaling_factor=0.5, force_upcast=True,
                latents_mean=[-1.6574, 1.886, -1.383, 2.5155], latents_std=[8.4927, 5.9022, 6.5498, 5.2299])


def tiny_folder() -> Path:
    from pgv25.tiny import ensure_tiny_assets

    import os

    root = Path(os.environ.get("PGV25_CACHE", "~/.cache/pgv25")).expanduser() / "tiny_shapes"
    ensure_tiny_assets(root, image_size=64, per_caption=2, vae_steps=20, seed=0)
    return root / "playground-v2.5-tiny"


def build_pipeline(arch: str, device: str, dtype: torch.dtype, model: str | None = None):
    from diffusers import AutoencoderKL, EDMDPMSolverMultistepScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    if model is not None:  # a local pipeline folder: the real Playground v2.5, an export, the tiny model
        return StableDiffusionXLPipeline.from_pretrained(model, torch_dtype=dtype).to(device)
    folder = tiny_folder()
    if arch == "tiny":
        return StableDiffusionXLPipeline.from_pretrained(folder, torch_dtype=dtype).to(device)
    tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    tokenizer_2 = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer_2")
    torch.manual_seed(0)
    with torch.device(device):
        vocab = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id or 0,
                     bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
        text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP_L, **vocab)).to(dtype)
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIG_G, **vocab)).to(dtype)
        vae = AutoencoderKL(**SDXL_VAE).to(dtype)
        unet = UNet2DConditionModel.from_config(PLAYGROUND_UNET).to(dtype)
    scheduler = EDMDPMSolverMultistepScheduler(**{k: v for k, v in PLAYGROUND_SCHEDULER.items() if k != "sigma_schedule"},
                                               solver_order=2, algorithm_type="dpmsolver++", final_sigmas_type="zero")
    return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                                     tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler)


def seconds_per_image(run, images: int, device: str) -> tuple[float, float]:
    """(the first call's seconds, compilation included; the median of the next `images`)."""
    times = []
    for _ in range(images + 1):
        sync(device)
        start = time.perf_counter()
        run()
        sync(device)
        times.append(time.perf_counter() - start)
    return times[0], statistics.median(times[1:])


# Rows in this order: the levers change the pipeline in place, each variant adding to the one before.
VARIANTS = ["diffusers", "pgv25", "levers", "levers+compile"]


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", choices=["playground", "tiny"], default="playground")
    parser.add_argument("--model", help="a local pipeline folder to time instead (e.g. a downloaded Playground v2.5)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--images", type=int, default=3, help="timed images per row (median), after one untimed")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=VARIANTS,
                        help="diffusers: the pipeline as its docs call it; pgv25: `pgv25 generate --eager`; levers: fused QKV, "
                             "channels-last, cuDNN attention first (`pgv25 generate` on a GPU); levers+compile: and "
                             "the transformer blocks compiled (`--compile`)")
    parser.add_argument("--compile-backend", default="inductor", help="'eager' to try the compiled path on a CPU quickly")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    # bf16 on a GPU: fp32's range, so the SDXL VAE decodes without the fp16 upcast round trip
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    pipe = configure_pipeline(build_pipeline(args.arch, args.device, dtype, args.model), "dpmpp", args.device, dtype)
    prompt = "a cat wearing a space suit, studio photo"
    rows, applied = [], []

    def diffusers_path():
        pipe(prompt, num_inference_steps=args.steps, guidance_scale=args.guidance, width=args.size, height=args.size,
             generator=torch.Generator("cpu").manual_seed(0))

    def pgv25_path():
        generate(pipe, [prompt], seed=0, steps=args.steps, guidance_scale=args.guidance, width=args.size, height=args.size)

    for variant in sorted(args.variants, key=VARIANTS.index):
        if variant.startswith("levers"):
            wanted = ["fused_qkv", "channels_last", "cudnn_attention"] + (["compile"] if variant.endswith("compile") else [])
            apply_speed_levers(pipe, [lever for lever in wanted if lever not in applied],
                               compile_options={"backend": args.compile_backend})
            applied = wanted
        first, median = seconds_per_image(diffusers_path if variant == "diffusers" else pgv25_path, args.images, args.device)
        row = {"variant": variant, "seconds_per_image": median, "first_image_s": first}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{args.size}² × {args.steps} steps, CFG {args.guidance}, on {device_name(args.device)}")
    for row in rows:
        print(f"  {row['variant']:15s} {row['seconds_per_image']:.3f} s/image (first {row['first_image_s']:.1f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "device": device_name(args.device), "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
