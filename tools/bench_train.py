"""Training-step throughput, MFU and memory of the Playground v2.5 UNet: pgv25's step vs the reference step.

    python tools/bench_train.py                                   # full-size UNet on the GPU, 1024² and 896×1152
    python tools/bench_train.py --variants full ckpt adamw8bit lora64 --batch 1 2 4 8 16 --markdown out.md
    python tools/bench_train.py --arch tiny --device cpu --size 64x64 --batch 2 --steps 2   # a smoke run on CPU

The UNet is built from its config with random weights (no download): Playground v2.5's UNet is the
SDXL UNet, 2,567,463,684 parameters. Inputs are synthetic cached latents and text embeddings of
the real shapes (latents 4 × h/8 × w/8, prompt embeddings 77 × 2048, pooled 1280).

- pgv25 step: the runner's training step built from pgv25's own pieces: EDMLoss(EDMDenoiser(unet))
  with Karras-index σ, bf16 autocast over fp32 master weights, pgv25's optimizer builder (fused AdamW
  on CUDA), gradient norm and the non-finite guard with one host sync per step.
- reference step: the EDM path of diffusers' SDXL DreamBooth-LoRA script (`--do_edm_style_training`),
  written out here: EDMEulerScheduler's Karras σ by random index, `precondition_inputs`/`outputs`,
  MSE to x0, torch.optim.AdamW with default settings, bf16 autocast, `loss.item()` each step for its
  progress bar.

The two are timed one after the other, and with `--rounds` every row again round after round (each with a
fresh optimizer), so drift hits all rows alike; each row is the median over rounds with its spread.
FLOPs per step are counted with torch.utils.flop_counter (forward + backward, matmul/conv/attention),
MFU = FLOPs / step time / peak (`--peak-tflops`, 989 dense bf16 for H100/H200 SXM).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pgv25 import edm  # noqa: E402
from pgv25.engine.optim import build_optimizer  # noqa: E402
from pgv25.models.edm_denoiser import Conditioning, EDMDenoiser, EDMLoss  # noqa: E402
from pgv25.models.playground_configs import SCHEDULER, UNET  # noqa: E402

PLAYGROUND_UNET, PLAYGROUND_SCHEDULER = UNET, SCHEDULER  # the names the other tools import
VARIANTS = ("full", "ckpt", "adamw8bit", "lora64", "compile")
# Speed levers, added to a variant with '+' (e.g. full+cl+bf16norm+regional); measured on pgv25's step only,
# to compare with the plain variant's row of the same run (the reference step stays as diffusers writes it).
LEVERS = {
    "cl": "channels-last UNet and latents",
    "bf16norm": "GroupNorm/LayerNorm in bf16 (pgv25.models.speed.low_precision_norms)",
    "cudnn": "cuDNN attention (sdpa_kernel CUDNN_ATTENTION)",
    "flash": "flash attention (sdpa_kernel FLASH_ATTENTION)",
    "regional": "torch.compile of each BasicTransformerBlock",
    "regional_resnet": "torch.compile of each BasicTransformerBlock and ResnetBlock2D",
}


def parse_variant(text: str) -> tuple[str, list[str]]:
    base, *levers = text.split("+")
    if base not in VARIANTS or any(lever not in LEVERS for lever in levers):
        raise argparse.ArgumentTypeError(f"{text!r}: a variant is one of {', '.join(VARIANTS)}, "
                                         f"optionally +{'+'.join(LEVERS)}")
    return base, levers


def build_unet(arch: str, device: str, seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    if arch == "tiny":
        from pgv25.tiny.base_pipeline import build_unet as tiny_unet

        return tiny_unet(64).to(device)
    with torch.device(device):  # allocate straight on the GPU: no 10 GB host copy
        return UNet2DConditionModel.from_config(PLAYGROUND_UNET)


def synthetic_batch(unet, batch: int, height: int, width: int, factor: int, device: str, seed: int = 0) -> dict:
    config = unet.config
    pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    g = torch.Generator(device).manual_seed(seed)
    h, w = height // factor, width // factor
    return {
        "latents": torch.randn(batch, config.in_channels, h, w, generator=g, device=device) * 0.5,
        "prompt_embeds": torch.randn(batch, 77, config.cross_attention_dim, generator=g, device=device),
        "pooled": torch.randn(batch, pooled, generator=g, device=device),
        "time_ids": torch.tensor([[height, width, 0, 0, height, width]], device=device, dtype=torch.float32).repeat(batch, 1),
    }


class Pgv25Step:
    """The runner's step (Trainer.micro_step + Trainer.step) on one process, from the same pieces."""

    def __init__(self, unet, optimizer_type: str, device: str, autocast):
        self.sampler = edm.build_sigma_sampler("karras_index", PLAYGROUND_SCHEDULER)
        self.objective = EDMLoss(EDMDenoiser(unet, 0.5, "epsilon"), "none")
        self.params = [p for p in unet.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.params, {"type": optimizer_type, "lr": 1e-5, "weight_decay": 1e-2},
                                         on_cuda=device == "cuda")
        self.generator = torch.Generator(device).manual_seed(0)
        self.autocast, self.device = autocast, device

    def __call__(self, batch: dict) -> torch.Tensor:
        x0 = batch["latents"]
        cond = Conditioning(batch["prompt_embeds"], batch["pooled"], batch["time_ids"])
        sigma = self.sampler(len(x0), self.generator, self.device)
        noise = torch.randn(x0.shape, generator=self.generator, device=self.device)
        with self.autocast():
            loss = self.objective(x0, sigma, noise, cond).mean()
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, math.inf)
        if not bool(torch.stack([~torch.isfinite(loss), ~torch.isfinite(grad_norm)]).any()):  # the one host sync
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


class ReferenceStep:
    """diffusers' `--do_edm_style_training` step (SDXL DreamBooth-LoRA script), written from its documented procedure."""

    def __init__(self, unet, optimizer_type: str, device: str, autocast):
        from diffusers import EDMEulerScheduler

        self.unet, self.device, self.autocast = unet, device, autocast
        self.scheduler = EDMEulerScheduler(**PLAYGROUND_SCHEDULER)
        params = [p for p in unet.parameters() if p.requires_grad]
        if optimizer_type == "AdamW8bit":
            import bitsandbytes as bnb

            self.optimizer = bnb.optim.AdamW8bit(params, lr=1e-5, weight_decay=1e-2)
        else:
            self.optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=1e-2)
        self.sigmas = self.scheduler.sigmas.to(device)
        self.timesteps = self.scheduler.timesteps.to(device)

    def __call__(self, batch: dict) -> torch.Tensor:
        model_input = batch["latents"]
        noise = torch.randn_like(model_input)
        indices = torch.randint(0, self.scheduler.config.num_train_timesteps, (model_input.shape[0],), device=self.device)
        timesteps = self.timesteps[indices]
        sigmas = self.sigmas[indices].view(-1, 1, 1, 1)
        noisy = model_input + noise * sigmas
        inputs = self.scheduler.precondition_inputs(noisy, sigmas)
        with self.autocast():
            model_pred = self.unet(inputs, timesteps, encoder_hidden_states=batch["prompt_embeds"],
                                   added_cond_kwargs={"text_embeds": batch["pooled"], "time_ids": batch["time_ids"]}).sample
        model_pred = self.scheduler.precondition_outputs(noisy, model_pred, sigmas)
        loss = torch.nn.functional.mse_loss(model_pred.float(), model_input.float(), reduction="mean")
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss.item()  # the script's progress-bar log, every step
        return loss.detach()


def count_flops(step, batch: dict) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step(batch)
    return counter.get_total_flops()


def timed(step, batch: dict, warmup: int, steps: int, device: str) -> dict:
    for _ in range(warmup):
        step(batch)
    sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step(batch)
        sync(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    return {"step_s": statistics.median(times), "peak_gib": peak}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class WithAttention:
    """A step run under one scaled-dot-product-attention kernel."""

    def __init__(self, step, backend: str):
        self.step, self.backend = step, backend

    def __call__(self, batch: dict) -> torch.Tensor:
        from pgv25.models.speed import attention_backend

        with attention_backend(self.backend):
            return self.step(batch)


def prepare(text: str, args):
    """A fresh UNet set up for the variant; returns (unet, optimizer type) or raises RuntimeError('skip: ...')."""
    from pgv25.models import speed

    variant, levers = parse_variant(text)
    if variant == "adamw8bit" and importlib.util.find_spec("bitsandbytes") is None:
        raise RuntimeError("skip: 8-bit AdamW needs bitsandbytes (pip install bitsandbytes)")
    if {"cudnn", "flash"} & set(levers) and args.device != "cuda":
        raise RuntimeError("skip: cuDNN/flash attention need CUDA")
    unet = build_unet(args.arch, args.device).train()
    if args.channels_last or "cl" in levers:
        unet.to(memory_format=torch.channels_last)
    if "bf16norm" in levers:
        speed.low_precision_norms(unet)
    if "regional" in levers or "regional_resnet" in levers:
        blocks = ("transformer", "resnet") if "regional_resnet" in levers else ("transformer",)
        speed.compile_regions(unet, blocks, mode=args.compile_mode, dynamic=False)
    if variant == "ckpt":
        unet.enable_gradient_checkpointing()
    if variant == "lora64":
        from pgv25.models.lora import add_lora

        add_lora(unet, {"rank": 64, "alpha": 64})
    if variant == "compile":
        unet.compile(mode=args.compile_mode)
    return unet, "AdamW8bit" if variant == "adamw8bit" else "AdamW"


def measure(variant: str, batch_size: int, size: tuple[int, int], args, count: bool = True) -> dict:
    row = {"variant": variant, "batch": batch_size, "size": f"{size[1]}x{size[0]}"}
    _, levers = parse_variant(variant)
    backend = next((lever for lever in levers if lever in ("cudnn", "flash")), None)
    compiled = variant.startswith("compile") or any(lever.startswith("regional") for lever in levers)
    autocast = (lambda: torch.autocast("cuda", torch.bfloat16)) if args.device == "cuda" else (lambda: torch.autocast("cpu", enabled=False))
    try:
        unet, optimizer_type = prepare(variant, args)
    except RuntimeError as error:
        return {**row, "error": str(error)}
    batch = synthetic_batch(unet, batch_size, *size, args.latent_factor, args.device)
    if args.channels_last or "cl" in levers:
        batch["latents"] = batch["latents"].contiguous(memory_format=torch.channels_last)
    sides = (("pgv25", Pgv25Step),) if levers else (("pgv25", Pgv25Step), ("reference", ReferenceStep))
    timings, flops, reference_oom = {}, None, False
    try:
        for name, cls in sides:  # one after the other; rounds over all rows are interleaved()'s
            try:
                step = cls(unet, optimizer_type, args.device, autocast)
                if backend:
                    step = WithAttention(step, backend)
                if count and name == "pgv25" and not compiled:
                    flops = count_flops(step, batch)
                timings[name] = timed(step, batch, args.warmup, args.steps, args.device)
            except torch.OutOfMemoryError:
                if name == "pgv25":
                    return {**row, "error": "OOM"}
                reference_oom = True  # ours fits where the reference does not (its fp32 AdamW at batch 8 on 80 GB)
            step = None
            gc.collect()
            if args.device == "cuda":
                torch.cuda.empty_cache()
    finally:
        del unet
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
    ours = timings["pgv25"]["step_s"]
    row.update({"images_per_s": batch_size / ours, "step_s": ours, "peak_gib": timings["pgv25"]["peak_gib"]})
    if reference_oom:
        row["reference_error"] = "OOM"
    if "reference" in timings:
        ref = timings["reference"]["step_s"]
        row.update({"reference_images_per_s": batch_size / ref, "speedup_vs_reference": ref / ours,
                    "reference_peak_gib": timings["reference"]["peak_gib"]})
    if flops:
        row["tflop_per_step"] = flops / 1e12
        if args.device == "cuda":  # against the GPU's dense bf16 peak; meaningless for a CPU
            row["mfu"] = flops / ours / (args.peak_tflops * 1e12)
    return row


def interleaved(args) -> list[dict]:
    """Every row measured once per round, all rows round after round, so a machine's drift between rounds (the same
    step has measured 9.2 and 11.4 images/s ten minutes apart on one H200) hits every row alike. Each row is the median
    over rounds, with `spread` = (slowest − fastest) / median step; a lever row is set against the reference step of
    its plain variant's row, measured in the same rounds. With one round each row is printed as soon as it is timed."""
    samples: dict[tuple, list[dict]] = {}
    failed: dict[tuple, int] = {}  # (variant, size) -> the batch that failed: larger ones will not do better
    for round_index in range(args.rounds):
        for variant in args.variants:
            for size in map(parse_size, args.size):
                for batch_size in args.batch:
                    if batch_size >= failed.get((variant, size), math.inf):
                        break
                    row = measure(variant, batch_size, size, args, count=round_index == 0)  # FLOPs do not drift
                    samples.setdefault((variant, size, batch_size), []).append(row)
                    print(json.dumps(row) if args.rounds == 1 else f"round {round_index + 1}: {json.dumps(row)}", flush=True)
                    if "error" in row:
                        failed[(variant, size)] = batch_size
                        break
    rows = [median_row(got, args) for got in samples.values()]
    for row in rows:
        plain = next((r for r in rows if "reference_images_per_s" in r and r["variant"] == parse_variant(row["variant"])[0]
                      and (r["size"], r["batch"]) == (row["size"], row["batch"])), None)
        if plain is not None and "images_per_s" in row and "reference_images_per_s" not in row:
            row.update(reference_images_per_s=plain["reference_images_per_s"],
                       speedup_vs_reference=row["images_per_s"] / plain["reference_images_per_s"])
    if args.rounds > 1:
        for row in rows:
            print(json.dumps(row), flush=True)
    return rows


def median_row(got: list[dict], args) -> dict:
    """One row from its rounds: median step times (an error in any round makes the row that error)."""
    errors = [r for r in got if "error" in r]
    if errors or len(got) == 1:
        return errors[0] if errors else got[0]
    batch, row = got[0]["batch"], dict(got[0])
    ours = statistics.median(r["step_s"] for r in got)
    row.update(images_per_s=batch / ours, step_s=ours, peak_gib=max(r["peak_gib"] for r in got), rounds=len(got),
               spread=(max(r["step_s"] for r in got) - min(r["step_s"] for r in got)) / ours)
    measured = [r for r in got if "reference_images_per_s" in r]  # a round whose reference ran out of memory has none
    if measured:
        ref = statistics.median(batch / r["reference_images_per_s"] for r in measured)
        row.update(reference_images_per_s=batch / ref, speedup_vs_reference=ref / ours,
                   reference_peak_gib=max(r["reference_peak_gib"] for r in measured))
    if "mfu" in row:
        row["mfu"] = row["tflop_per_step"] * 1e12 / ours / (args.peak_tflops * 1e12)
    return row


def markdown(rows: list[dict], args) -> str:
    lines = [f"`python tools/bench_train.py {' '.join(sys.argv[1:])}` on {device_name(args.device)}", "",
             "| variant | size | batch | images/s | step s | spread | TFLOP/step | MFU | peak GiB | reference images/s | ×reference |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | {r['size']} | {r['batch']} | {r['error']} | | | | | | | |")
            continue
        mfu = f"{r['mfu']:.1%}" if "mfu" in r else "–"
        tflop = f"{r['tflop_per_step']:.4g}" if "tflop_per_step" in r else "–"
        ref = (f"{r['reference_images_per_s']:.2f} | {r['speedup_vs_reference']:.2f}" if "reference_images_per_s" in r
               else f"{r['reference_error']} | –" if "reference_error" in r else "– | –")
        spread = f"{r['spread']:.0%}" if "spread" in r else "–"
        lines.append(f"| {r['variant']} | {r['size']} | {r['batch']} | {r['images_per_s']:.2f} | {r['step_s']:.3f} | {spread} | {tflop} | {mfu} "
                     f"| {r['peak_gib']:.1f} | {ref} |")
    return "\n".join(lines)


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"


def parse_size(text: str) -> tuple[int, int]:
    width, height = (int(v) for v in text.lower().split("x"))
    return height, width


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", choices=["playground", "tiny"], default="playground")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--variants", nargs="+", type=lambda v: parse_variant(v) and v, default=["full", "ckpt", "adamw8bit", "lora64"],
                        help=f"{', '.join(VARIANTS)}, each optionally with +lever: {'; '.join(f'{k}: {v}' for k, v in LEVERS.items())}")
    parser.add_argument("--size", nargs="+", default=["1024x1024", "896x1152"], help="WxH in pixels")
    parser.add_argument("--latent-factor", type=int, help="pixels per latent (8 for the SDXL VAE; 4 for the tiny one)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2, help="rounds over all rows (each row the median over rounds)")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile-mode", default=None)
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--json")
    parser.add_argument("--markdown")
    args = parser.parse_args(argv)
    args.latent_factor = args.latent_factor or (4 if args.arch == "tiny" else 8)
    rows = interleaved(args)
    table = markdown(rows, args)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "device": device_name(args.device), "rows": rows}, indent=2))
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    return rows


if __name__ == "__main__":
    main()
