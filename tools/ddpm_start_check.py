"""Is a DDPM-schedule model's failure at the extremes the terminal SNR? Sample the pure black and pure white
background prompts two ways from the same export and score both with the shapes evaluator:

- text-to-image: sampling starts at t = 999 from pure noise, as it always does;
- img2img at strength 1.0 from a dataset-like image of the prompt: it also starts at t = 999, but from
  √ᾱ·x0 + √(1−ᾱ)·n, which keeps the √ᾱ_999 ≈ 0.068 of signal that SDXL's schedule always left in training.

    python tools/ddpm_start_check.py work_dirs/experiments/noise_schedule/ddpm/step1500

What img2img recovers is what the non-zero terminal SNR costs; what it does not is the rest of the gap.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pgv25.eval.shapes import evaluate_images  # noqa: E402
from pgv25.tiny.shapes import caption, combinations, draw  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", help="an export of a model.noise_schedule='ddpm' run")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args(argv)
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    img2img = StableDiffusionXLImg2ImgPipeline.from_pretrained(args.model)
    text2img = StableDiffusionXLPipeline(**img2img.components)
    combos = [c for c in combinations(held_out=False) if c[2] in ("black", "white")]
    rng = random.Random(7)
    results = {"text-to-image, from pure noise": [], "img2img strength 1.0, from t=999 with its signal": []}
    for k, combo in enumerate(combos):
        prompt = caption(*combo)
        common = dict(num_inference_steps=args.steps, guidance_scale=args.guidance)
        image = text2img(prompt, height=args.size, width=args.size, generator=torch.Generator().manual_seed(k), **common).images[0]
        results["text-to-image, from pure noise"].append((combo, image))
        start = draw(*combo, args.size, rng)
        image = img2img(prompt, image=start, strength=1.0, generator=torch.Generator().manual_seed(k), **common).images[0]
        results["img2img strength 1.0, from t=999 with its signal"].append((combo, image))
    for name, items in results.items():
        scores, _ = evaluate_images(items)
        print(f"{name}: " + json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in scores.items()}), flush=True)


if __name__ == "__main__":
    main()
