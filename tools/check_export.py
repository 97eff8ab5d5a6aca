#!/usr/bin/env python
"""Load an exported step folder with plain diffusers (pgv25 is not imported) and generate from it.

    python tools/check_export.py work_dirs/playgroundv2_5_tiny_shapes/step1500 \
        --base ~/.cache/pgv25/tiny_shapes/playground-v2.5-tiny --out /tmp/check.png

Checks both ways users load our exports:
1. DiffusionPipeline.from_pretrained(step_dir) → StableDiffusionXLPipeline with EDMDPMSolverMultistepScheduler;
2. UNet2DConditionModel.from_pretrained(step_dir, subfolder="unet") dropped into the base pipeline.
Prints one JSON line; exits non-zero if a check fails.
"""

import argparse
import json
import sys

import torch
from diffusers import DiffusionPipeline, UNet2DConditionModel


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step_dir")
    parser.add_argument("--base", help="the base pipeline folder (or hub id) for the UNet-only pattern")
    parser.add_argument("--prompt", default="a red circle on a white background")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--out", help="save the generated image here")
    args = parser.parse_args()

    pipe = DiffusionPipeline.from_pretrained(args.step_dir)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(args.prompt, num_inference_steps=args.steps, guidance_scale=3.0,
                 generator=torch.Generator().manual_seed(0)).images[0]
    if args.out:
        image.save(args.out)
    report = {
        "pipeline": type(pipe).__name__,
        "scheduler": type(pipe.scheduler).__name__,
        "image_size": list(image.size),
        "pgv25_imported": "pgv25" in sys.modules,
    }
    ok = report["pipeline"] == "StableDiffusionXLPipeline" and report["scheduler"] == "EDMDPMSolverMultistepScheduler"
    if args.base:
        unet = UNet2DConditionModel.from_pretrained(args.step_dir, subfolder="unet")
        base = DiffusionPipeline.from_pretrained(args.base, unet=unet)
        base.set_progress_bar_config(disable=True)
        again = base(args.prompt, num_inference_steps=args.steps, guidance_scale=3.0,
                     generator=torch.Generator().manual_seed(0)).images[0]
        difference = float(torch.tensor(list(again.getdata())).float().sub(torch.tensor(list(image.getdata())).float()).abs().max())
        report["unet_into_base_max_pixel_difference"] = difference
        ok = ok and difference <= 1
    ok = ok and not report["pgv25_imported"]
    report["ok"] = ok
    print(json.dumps(report))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
