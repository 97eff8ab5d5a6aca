"""Generate images from an exported (or any Playground/SDXL) pipeline with plain diffusers."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from .errors import UserError
from .models.loading import check_pipeline_folder

logger = logging.getLogger(__name__)

# Playground v2.5's model card: EDM DPM++ 2M (Karras) at guidance 3, or EDM Euler at guidance 5.
# `native` keeps the folder's own scheduler (a ddpm-schedule export carries a DDPM sampler).
DEFAULT_GUIDANCE = {"dpmpp": 3.0, "euler": 5.0, "native": 3.0}


def load_pipeline(model_dir: str | Path, scheduler: str = "dpmpp", device: str | None = None, dtype: torch.dtype | None = None,
                  lora: str | Path | None = None, **components):
    """`StableDiffusionXLPipeline.from_pretrained` on a folder; `euler` swaps in `EDMEulerScheduler`;
    `lora`: a folder with `pytorch_lora_weights.safetensors`, applied with `pipe.load_lora_weights`;
    `components`: modules to use instead of the folder's (`unet=`, `text_encoder=`: the ones being trained)."""
    from diffusers import StableDiffusionXLPipeline

    if scheduler not in DEFAULT_GUIDANCE:
        raise UserError(f"--scheduler must be one of {', '.join(DEFAULT_GUIDANCE)}, got '{scheduler}'")
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise UserError(f"model directory {model_dir} does not exist")
    check_pipeline_folder(model_dir)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.float16 if device == "cuda" else torch.float32)
    pipe = StableDiffusionXLPipeline.from_pretrained(model_dir, torch_dtype=dtype, **components)
    if lora is not None:
        lora = Path(lora)
        from .models.lora_files import LORA_FILE

        if not (lora / LORA_FILE).is_file():
            raise UserError(f"{lora} holds no {LORA_FILE} (a LoRA export is work_dirs/<config>/step<N>)")
        try:
            pipe.load_lora_weights(str(lora), weight_name=LORA_FILE)  # named: diffusers before 0.40 asks for it offline
        except (ImportError, ValueError) as error:
            raise UserError(f"cannot apply the LoRA in {lora}: {str(error).strip().splitlines()[0]}") from None
    return configure_pipeline(pipe, scheduler, device, dtype)


def configure_pipeline(pipe, scheduler: str = "dpmpp", device: str = "cpu", dtype: torch.dtype = torch.float32):
    """The sampler (`dpmpp`: EDM DPM++ 2M, Playground's own; `euler`: EDM Euler; `native`: the pipeline's), the VAE kept in fp32
    when its config asks (the SDXL VAE overflows in fp16), no progress bar, on `device`."""
    from diffusers import EDMDPMSolverMultistepScheduler, EDMEulerScheduler

    scheduler_class = EDMEulerScheduler if scheduler == "euler" else EDMDPMSolverMultistepScheduler
    if scheduler != "native" and not isinstance(pipe.scheduler, scheduler_class):
        pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config)
    if getattr(pipe.vae.config, "force_upcast", False) and dtype == torch.float16:
        pipe.vae.to(torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def speed_levers(device: str, eager: bool = False, compile_blocks: bool = False, lora: bool = False) -> list[str]:
    """Which of generation's speed levers `pgv25 generate` turns on. On one H200 (1024², 50 steps, CFG 3, bf16;
    docs/performance.md) all four took an image from 4.74 s to 2.88 s, after a 10.6 s compile.

    - `fused_qkv`: one matmul for q, k and v. Not with a LoRA loaded: the fused projection is built from the base
      weights and would drop the LoRA's update of q, k and v.
    - `channels_last`: a channels-last UNet (cuDNN's convolutions run NHWC natively).
    - `cudnn_attention`: scaled_dot_product_attention tries cuDNN's kernel first (Hopper's fastest), the others after.
    - `compile`: torch.compile of each transformer block (regional: seconds, once per image size). Asked for with
      `compile_blocks`, on any device: it pays once an image size is reused (about 6 images at 1024² above).

    The first three are on for CUDA unless `eager`; a CPU keeps the plain pipeline."""
    if eager:
        return []
    levers = ["fused_qkv", "channels_last", "cudnn_attention"] if torch.device(device).type == "cuda" else []
    if lora and "fused_qkv" in levers:
        levers.remove("fused_qkv")
    return levers + (["compile"] if compile_blocks else [])


def apply_speed_levers(pipe, levers: list[str], compile_options: dict | None = None):
    """Turn on `levers` (names from `speed_levers`) in place, adding to any turned on before; the images stay the
    same up to rounding."""
    unknown = set(levers) - {"fused_qkv", "channels_last", "cudnn_attention", "compile"}
    if unknown:
        raise ValueError(f"unknown speed levers {sorted(unknown)}")
    if "fused_qkv" in levers:
        pipe.fuse_qkv_projections()
    if "channels_last" in levers:
        pipe.unet.to(memory_format=torch.channels_last)
    if "compile" in levers:  # training's regional compile; room for 8 image sizes' graphs before falling back to eager
        from .models.speed import compile_unet

        compile_unet(pipe.unet, {"enabled": True, "regions": ["transformer"], "fullgraph": True, **(compile_options or {})},
                     buckets=8, device=pipe.unet.device)
    if "cudnn_attention" in levers:
        pipe._pgv25_attention = "cudnn"  # read by generate()
    return pipe


def generate(pipe, prompts: list[str], seed: int = 0, steps: int = 50, guidance_scale: float = 3.0,
             negative_prompt: str | None = None, width: int | None = None, height: int | None = None,
             num_images: int = 1) -> list[Image.Image]:
    """`num_images` per prompt; image j of every prompt uses seed `seed + j`, so runs are comparable."""
    from .models.speed import attention_backend

    images = []
    with attention_backend(getattr(pipe, "_pgv25_attention", None)):
        for prompt in prompts:
            for j in range(num_images):
                generator = torch.Generator("cpu").manual_seed(seed + j)
                images += pipe(
                    prompt, negative_prompt=negative_prompt, num_inference_steps=steps, guidance_scale=guidance_scale,
                    width=width, height=height, generator=generator,
                ).images
    return images


@dataclass(frozen=True)
class PromptSpec:
    """One prompt as fine-tuners write validation prompts: each with its own seed, size, negative prompt, guidance."""

    prompt: str
    seed: int = 0
    width: int | None = None
    height: int | None = None
    negative_prompt: str | None = None
    guidance_scale: float = 3.0
    steps: int = 25
    own_size: bool = False  # the prompt set its own width/height: its label says so

    @property
    def label(self) -> str:
        return f"{self.prompt} ({self.width}×{self.height})" if self.own_size else self.prompt


def prompt_specs(prompts, defaults: dict, key: str) -> list[PromptSpec]:
    """`prompts`: strings and/or dicts (prompt, seed, width, height, negative_prompt, guidance_scale, steps);
    what a dict leaves out comes from `defaults`. Every mistake is one line naming `key`."""
    fields = set(PromptSpec.__dataclass_fields__) - {"own_size"}
    base = {k: v for k, v in defaults.items() if k in fields and k != "prompt"}
    specs = []
    for i, item in enumerate(prompts or []):
        item = {"prompt": item} if isinstance(item, str) else dict(item) if isinstance(item, dict) else None
        if item is None or not isinstance(item.get("prompt"), str) or not item["prompt"].strip():
            raise UserError(f"{key}[{i}] must be a prompt or a dict with a non-empty 'prompt'")
        unknown = set(item) - fields
        if unknown:
            raise UserError(f"{key}[{i}]: unknown key(s) {', '.join(sorted(unknown))} (allowed: {', '.join(sorted(fields))})")
        spec = {**base, **{k: v for k, v in item.items() if v is not None or k == "negative_prompt"}}
        for side in ("width", "height"):
            value = spec.get(side)
            if value is not None and (not isinstance(value, int) or value <= 0 or value % 8):
                raise UserError(f"{key}[{i}].{side} must be a positive multiple of 8, got {value!r}")
        specs.append(PromptSpec(**spec, own_size="width" in item or "height" in item))
    return specs


def generate_specs(pipe, specs: list[PromptSpec]) -> list[Image.Image]:
    """One image per spec, each from its own seeded CPU generator (the same image on any device count)."""
    return [pipe(spec.prompt, negative_prompt=spec.negative_prompt, num_inference_steps=spec.steps,
                 guidance_scale=spec.guidance_scale, width=spec.width, height=spec.height,
                 generator=torch.Generator("cpu").manual_seed(spec.seed)).images[0] for spec in specs]


def labelled_grid(images: list[Image.Image], labels: list[str], columns: int = 4, cell: int = 192) -> Image.Image:
    """Images scaled to fit `cell` px (nearest, so small samples stay crisp) with their prompt underneath.

    Columns are `cell` wide (room for the label); rows are as tall as the tallest scaled image, so a sheet of
    wide images has no empty band under each.
    """
    font = ImageFont.load_default()
    label_h = 28
    rows = (len(images) + columns - 1) // columns
    image_h = max(round(im.height * cell / max(im.size)) for im in images) if images else cell
    grid = Image.new("RGB", (columns * cell, rows * (image_h + label_h)), (128, 128, 128))
    pen = ImageDraw.Draw(grid)
    for i, (image, label) in enumerate(zip(images, labels)):
        x, y = (i % columns) * cell, (i // columns) * (image_h + label_h)
        scale = cell / max(image.size)
        resized = image.resize((round(image.width * scale), round(image.height * scale)), Image.NEAREST)
        grid.paste(resized, (x, y))
        words, lines = label.split(), [""]
        for word in words:  # wrap into at most two lines
            if len(lines[-1]) + len(word) > cell // 6 and len(lines) < 2:
                lines.append("")
            lines[-1] = (lines[-1] + " " + word).strip()
        pen.text((x + 3, y + image_h + 2), "\n".join(lines), fill=(255, 255, 255), font=font)
    return grid


def write_outputs(images: list[Image.Image], labels: list[str], out: Path) -> list[Path]:
    """One image: `out` itself. Several: `out` is a labelled grid and each image is saved beside it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if len(images) == 1:
        images[0].save(out)
        return [out]
    paths = []
    for i, image in enumerate(images):
        path = out.with_name(f"{out.stem}_{i:02d}{out.suffix}")
        image.save(path)
        paths.append(path)
    labelled_grid(images, labels).save(out)
    return [out, *paths]
