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

from pgv25.generate import configure_pipeline, generate  # noqa: E402

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


def build_pipeline(arch: str, device: str, dtype: torch.dtype):
    from diffusers import AutoencoderKL, EDMDPMSolverMultistepScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

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


def seconds_per_image(run, images: int, device: str) -> float:
    run()  # warm-up (and compilation)
    times = []
    for _ in range(images):
        sync(device)
        start = time.perf_counter()
        run()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", choices=["playground", "tiny"], default="playground")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--images", type=int, default=3, help="timed images per row (median)")
    parser.add_argument("--compile", choices=["none", "default", "max-autotune"], nargs="+", default=["none", "max-autotune"])
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    # bf16 on a GPU: fp32's range, so the SDXL VAE decodes without the fp16 upcast round trip
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    pipe = build_pipeline(args.arch, args.device, dtype)
    prompt = "a cat wearing a space suit, studio photo"
    rows = []
    for mode in args.compile:
        if mode != "none":
            pipe.unet.compile(mode=None if mode == "default" else mode)
        ours = configure_pipeline(pipe, "dpmpp", args.device, dtype)

        def pgv25_path():
            generate(ours, [prompt], seed=0, steps=args.steps, guidance_scale=args.guidance, width=args.size, height=args.size)

        def diffusers_path():
            pipe(prompt, num_inference_steps=args.steps, guidance_scale=args.guidance, width=args.size, height=args.size,
                 generator=torch.Generator("cpu").manual_seed(0))

        for name, run in (("pgv25", pgv25_path), ("diffusers", diffusers_path)):
            row = {"path": name, "compile": mode, "seconds_per_image": seconds_per_image(run, args.images, args.device)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{args.size}² × {args.steps} steps, CFG {args.guidance}, on {device_name(args.device)}")
    for row in rows:
        print(f"  {row['path']:9s} compile={row['compile']:13s} {row['seconds_per_image']:.3f} s/image")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "device": device_name(args.device), "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
