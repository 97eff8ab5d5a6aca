"""The real path at full size, end to end, within a time budget (one GPU; not part of CI).

    python tools/gpu_check.py --out OUT --budget 540                  # on a GPU machine
    python tools/gpu_check.py --out OUT --small --resolution 256      # the same stages on a CPU, reduced model

Stages, each recorded in OUT/gpu_check.json as soon as it ends (a timeout keeps what finished):

1. env: GPU, torch/diffusers versions, free space where the run writes.
2. base: tools/build_fullsize_base.py on the GPU (random weights, Playground's exact configs, fp16).
3. images: photo-like JPEGs in five aspect ratios with captions (a `folder` dataset).
4. train: `pgv25 train playgroundv2_5_pokemon_blip` pointed at both with --cfg-options: bf16, loader
   workers, VAE and text encoders on the GPU, fused AdamW, a checkpoint and export at iteration 20, on to
   30 with a loss logged every iteration; killed with SIGKILL once iteration 30 is logged (the save at 30
   is cut off: the checkpoint at 20 must stay intact, which `pgv25 ckpt verify` then checks).
5. generate: one 1024² image, 50 steps with CFG, from the export with plain diffusers in a separate
   process that never imports pgv25; on a GPU then again with diffusers' own speed levers (fused QKV,
   channels-last, cuDNN attention first, `compile_repeated_blocks`), with the compile's seconds.
6. resume: `--resume` from the checkpoint at 20 to 30 in a new work dir: its losses at 21..30 against the
   uninterrupted run's, its own checkpoint and export at 30.
7. bench: tools/bench_train.py at the same batch: the bare step (and the reference step), then the speed
   levers (channels-last, bf16 norms, cuDNN attention, regional compilation) each against it.
8. runner variants (--runner-variants): short runs of the whole loop with the latent cache on (`cache`) or off
   (`nocache`: the VAE and text encoders every step; `vae_bf16`: and the VAE in bf16), without the GPU speed
   defaults (`eager`), with 8 loader workers (`workers8`), or with 8-bit AdamW (`adamw8bit`: bitsandbytes,
   from `tools/device_wheels.py`); and the memory levers, each with its peak (RSS on a CPU): `adafactor`,
   `bf16_adafactor_fused` and `bf16_adamw8bit_fused` (bf16 weights, stochastic rounding, the update inside
   backward), `lora_fp32` and `lora_bf16` (a LoRA over an fp32 or a bf16 frozen UNet).

9. generate_pgv25: `tools/bench_generate.py` on the export (the base with --skip train): 1024², 50 steps with CFG,
   through pgv25's generate path with `pgv25 generate`'s GPU levers, then with its transformer blocks compiled.
10. eval_generate: `pgv25 eval generate` on a small prompt file in MJHQ-30K's layout; images/s from the images'
   write times once the first is out, and the hours MJHQ-30K's 30,000 images take on 8 such GPUs.

Runner variants take a batch after '@' (`24gb@1`: the 24 GB config's levers at batch 1). `--skip train` leaves out
stages 4-6 (the real path end to end, proven before) and runs the rest on the base: the lead in one call, with the
summary table's row written to OUT/summary_row.md (docs/performance.md, "Next on a GPU").

`--cfg-options` go to every run (e.g. `model.gradient_checkpointing=True export.dtype=bf16`); `--main-variant`
gives the main run and its resume one variant's levers. The full fine-tune of the 2.6B UNet in ≤ 12 GiB, trained,
checkpointed, killed, resumed and exported on a 24 GiB CPU machine (docs/performance.md):

    python tools/gpu_check.py --out OUT --resolution 256 --batch 1 --workers 0 --images 8 --checkpoint-at 2 \
        --iters 3 --steps 4 --skip bench --budget 5400 --cfg-options model.gradient_checkpointing=True \
        export.dtype=bf16 --main-variant bf16_adafactor_fused --runner-iters 2 \
        --runner-variants adafactor bf16_adamw8bit_fused lora_fp32 lora_bf16

Reported: each runner's images/s against the bare step's with the same levers at the same batch size
(the default runner against DEFAULTS_VARIANT, `eager` against `full`, `adamw8bit` against DEFAULTS_VARIANT with
8-bit AdamW), the iterations far slower than the median (a new bucket's compile), peak GPU memory,
checkpoint size and save time, resume exactness, generation seconds, and every failure with its stage.
Two full AdamW checkpoints (2 × 31 GB) do not fit beside the base on a 64 GB disk, so the checkpoint at
20 moves to /dev/shm before the resume when that has room.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / "tools"
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(TOOLS))

GIB = 2**30
STAGES = ["train", "generate", "resume", "bench", "generate_pgv25", "eval_generate"]  # what --skip can leave out
RATIOS = [(1024, 1024), (1152, 896), (896, 1152), (1216, 832), (832, 1216)]
# Cheap levers first: a budget cut-off then loses the compiled variants (a minute or more of compiling each).
LEVER_VARIANTS = ["full", "full+cl", "full+bf16norm", "full+cudnn", "full+cl+bf16norm", "full+regional",
                  "full+cl+bf16norm+cudnn+regional"]
# The bench variant with the levers the Playground configs turn on by default on a GPU (channels-last, cuDNN attention
# first, regional compilation): the bare step the default runner is compared with.
DEFAULTS_VARIANT = "full+cl+cudnn+regional"
PGV25 = "import sys; from pgv25.cli import main; sys.exit(main())"
# Runner variants to set beside the end-to-end run: what the whole loop costs over the bare step, part by part.
RUNNER_VARIANTS = {
    "cache": ["train_dataloader.dataset.cache.enabled=True", "train_dataloader.num_workers=0"],  # latents encoded once
    "nocache": ["train_dataloader.dataset.cache.enabled=False"],  # the VAE and text encoders every step
    "vae_bf16": ["model.vae_dtype=bf16", "train_dataloader.dataset.cache.enabled=False"],
    "eager": ["model.compile.enabled=False", "model.channels_last=False", "model.attention_backend=None"],
    "workers8": ["train_dataloader.num_workers=8", "train_dataloader.dataset.cache.enabled=False"],
    "adamw8bit": ["optim_wrapper.optimizer.type=AdamW8bit"],  # bitsandbytes' 8-bit moments: 15 GiB less than AdamW's
    # The memory levers (docs/performance.md, "Training in less memory"): fp32 weights with small optimizer states,
    # bf16 weights with stochastic rounding and the update inside backward, LoRA over an fp32 or a bf16 frozen UNet.
    "adafactor": ["optim_wrapper.optimizer.type=Adafactor"],
    "bf16_adafactor_fused": ["model.trained_dtype=bf16", "optim_wrapper.optimizer.type=Adafactor",
                             "optim_wrapper.fused_backward=True", "optim_wrapper.clip_grad=None"],
    "bf16_adamw8bit_fused": ["model.trained_dtype=bf16", "optim_wrapper.optimizer.type=AdamW8bit",
                             "optim_wrapper.fused_backward=True", "optim_wrapper.clip_grad=None"],
    "lora_fp32": ["model.lora.enabled=True", "model.frozen_dtype=fp32"],
    # FP8 (torchao) in the transformer blocks, against `cache`: the same runner, batches, σ and noise in bf16
    "float8": ["train_dataloader.dataset.cache.enabled=True", "train_dataloader.num_workers=0", "model.float8=True"],
    "lora_bf16": ["model.lora.enabled=True", "model.frozen_dtype=bf16"],
    # playgroundv2_5_pokemon_blip_24gb's levers (tested to match it): bf16 weights with stochastic rounding, 8-bit AdamW
    # moments, the update inside backward; with '@1' or '@2' its batch
    "24gb": ["model.trained_dtype=bf16", "optim_wrapper.optimizer.type=AdamW8bit", "optim_wrapper.rounding=stochastic",
             "optim_wrapper.fused_backward=True", "optim_wrapper.clip_grad=None"],
}


def variant_options(name: str) -> list[str]:
    """A runner variant's options; on a CPU, FP8 runs torchao's emulation (the path, not its speed)."""
    import torch

    options = RUNNER_VARIANTS[name]
    return options if torch.cuda.is_available() else [o.replace("model.float8=True", "model.float8=emulate") for o in options]


def runner_variant(text: str) -> tuple[str, int | None]:
    """'24gb@2' -> ('24gb', 2): a runner variant and the batch it runs at (None: --batch)."""
    name, at, batch = text.partition("@")
    if name not in RUNNER_VARIANTS or (at and not (batch.isdigit() and int(batch) > 0)):
        raise argparse.ArgumentTypeError(f"{text!r}: one of {', '.join(sorted(RUNNER_VARIANTS))}, optionally with @BATCH")
    return name, int(batch) if batch else None


class Report:
    """The results so far, rewritten to OUT/gpu_check.json after every stage."""

    def __init__(self, out: Path, budget: float):
        self.out, self.start, self.budget = out, time.time(), budget
        self.data = {"stages": {}, "failures": []}

    def left(self) -> float:
        return self.budget - (time.time() - self.start)

    def record(self, stage: str, result: dict) -> None:
        self.data["stages"][stage] = result
        if result.get("error"):
            self.data["failures"].append(f"{stage}: {result['error']}")
        self.data["elapsed_s"] = round(time.time() - self.start, 1)
        (self.out / "gpu_check.json").write_text(json.dumps(self.data, indent=2, default=str))
        print(f"[{self.data['elapsed_s']:7.1f}s] {stage}: {json.dumps(result, default=str)[:1500]}", flush=True)


def free_gib(path: Path) -> float:
    return shutil.disk_usage(path).free / GIB


def folder_gib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / GIB if path.exists() else 0.0


def stage_env(work: Path) -> dict:
    import torch

    import diffusers
    import transformers

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    shm = Path("/dev/shm")
    return {"gpu": gpu, "torch": torch.__version__, "cuda": torch.version.cuda, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "cpus": os.cpu_count(), "work": str(work),
            "work_free_gib": round(free_gib(work), 1), "shm_free_gib": round(free_gib(shm), 1) if shm.is_dir() else None}


def stage_base(folder: Path, device: str, small: bool, bpe: str | None) -> dict:
    import build_fullsize_base as builder

    vocab, merges = builder.clip_vocabulary(builder.find_bpe_file(bpe))
    configs = builder.reduced_configs() if small else None
    report = builder.build_base(folder, builder.build_tokenizers(vocab, merges), "fp16", device, configs=configs)
    report["gib"] = round(report.pop("bytes") / GIB, 2)
    report["vocab"] = len(vocab)
    return report


def photo(args) -> None:
    """One photo-like JPEG (bench_loader's: a smooth random colour field plus texture, so it compresses like a photo)."""
    import numpy as np

    from bench_loader import photo as photo_like

    path, width, height, seed = args
    photo_like((width, height), np.random.default_rng(seed)).save(path, quality=90)


def stage_images(folder: Path, count: int, resolution: int, ratios: list[tuple[int, int]] = RATIOS) -> dict:
    from concurrent.futures import ProcessPoolExecutor

    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    colours, things = ["red", "blue", "green", "golden", "grey"], ["fox", "lighthouse", "teapot", "mountain", "bicycle"]
    jobs, rows = [], []
    for i in range(count):
        w, h = ratios[i % len(ratios)]
        scale = resolution / 1024 * rng.uniform(1.0, 1.5)  # larger than the bucket: the loader resizes and crops
        name = f"{i:04d}.jpg"
        jobs.append((folder / name, int(w * scale), int(h * scale), i))
        rows.append({"file_name": name, "text": f"a photo of a {colours[i % 5]} {things[(i // 5) % 5]}, detailed, {i}"})
    with ProcessPoolExecutor(max(1, min(16, (os.cpu_count() or 2)))) as pool:
        list(pool.map(photo, jobs))
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"images": count, "gib": round(folder_gib(folder), 2)}


def train_options(args, base: Path, images: Path, work: Path, max_iters: int, optimizer: str,
                  batch: int | None = None) -> list[str]:
    return [
        f"model.pretrained_model_name_or_path={base}",
        "train_dataloader.dataset.type=folder", f"train_dataloader.dataset.path={images}",
        "train_dataloader.dataset.image_column=file_name", "train_dataloader.dataset.caption_column=text",
        f"train_dataloader.dataset.resolution={args.resolution}", f"train_dataloader.dataset.cache_dir={work / 'cache'}",
        f"train_dataloader.batch_size={batch or args.batch}", f"train_dataloader.num_workers={args.workers}",
        f"train_cfg.max_iters={max_iters}", f"default_hooks.checkpoint.interval={args.checkpoint_at}",
        "default_hooks.logger.interval=1", "validation.interval=0", "sample_grid.prompts=[]",
        f"optim_wrapper.optimizer.type={optimizer}",
    ]


def scalars(work_dir: Path) -> dict[int, dict]:
    path = work_dir / "scalars.jsonl"
    if not path.is_file():
        return {}
    rows = {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line being written
            continue
        rows[row["iteration"]] = row
    return rows


def main_rss(pid: int) -> int:
    """Resident bytes of the training process (its forked loader workers share most of its pages, so a sum
    over the tree would count them several times)."""
    import psutil

    try:
        return psutil.Process(pid).memory_info().rss
    except psutil.Error:
        return 0


def run_train(config: str, options: list[str], work_dir: Path, log: Path, timeout: float, resume: Path | None = None,
              kill_at: int | None = None) -> dict:
    """`pgv25 train` in a subprocess; with kill_at, SIGKILL once that iteration's scalars line is written."""
    command = [sys.executable, "-c", PGV25, "train", config, "--work-dir", str(work_dir), "--cfg-options", *options]
    if resume is not None:
        command[5:5] = ["--resume", str(resume)]
    start, killed, peak, steady = time.time(), False, 0, None
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=child_env(), start_new_session=True)
        while process.poll() is None:
            rss = main_rss(process.pid)
            peak = max(peak, rss)
            if rss and scalars(work_dir):  # training has logged an iteration: past loading, the steady state
                steady = max(steady or 0, rss)
            if time.time() - start > timeout:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                return {"error": f"timed out after {timeout:.0f} s", "log_tail": tail(log), "peak_rss_gib": round(peak / GIB, 1)}
            if kill_at is not None and kill_at in scalars(work_dir):
                time.sleep(1.0)  # into the save that follows the last iteration
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                killed = True
                break
            time.sleep(0.5)
    # peak: the whole process, loading included (a safetensors file being read is mapped into it); training: the
    # peak once the first iteration was logged
    result = {"returncode": process.returncode, "seconds": round(time.time() - start, 1), "killed": killed,
              "peak_rss_gib": round(peak / GIB, 1), "training_rss_gib": round(steady / GIB, 1) if steady else None,
              "planned_gib": planned_gib(config, options, resuming=resume is not None)}
    if process.returncode != 0 and not killed:
        result["error"] = f"exit {process.returncode}: {tail(log, 1)}"
        result["log_tail"] = tail(log)
    return result


def planned_gib(config: str, options: list[str], resuming: bool = False) -> float | None:
    """The memory planner's peak for this run (`pgv25 plan`: GPU allocated, or CPU resident), beside the measured one."""
    from dataclasses import replace

    import torch

    from pgv25.config import load_config, parse_cfg_options
    from pgv25.engine.options import read_options
    from pgv25.engine.plan import model_shapes, predict, setup_of, unet_file_bytes

    try:
        run = read_options(load_config(config, parse_cfg_options(options)))
        shapes, folder = model_shapes(run.model.pretrained)
        setup = setup_of(run, "cuda" if torch.cuda.is_available() else "cpu", 1)
        return round(predict(shapes, replace(setup, unet_file_bytes=unet_file_bytes(folder), resuming=resuming)).peak, 2)
    except Exception as error:  # noqa: BLE001 — a missing prediction must not fail the check
        print(f"no plan for {config}: {error}", flush=True)
        return None


def child_env() -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def tail(log: Path, lines: int = 15) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.is_file() else ""


def rates(rows: dict[int, dict], first: int, last: int, batch: int) -> dict:
    """Median images/s of iterations first..last (each logged alone) and the peak memory."""
    values = [rows[i]["images_per_s"] for i in range(first, last + 1) if i in rows]
    peak = max((r.get("gpu_peak_memory_gib", 0.0) for r in rows.values()), default=0.0)
    result = {"images_per_s_median": round(statistics.median(values), 3) if values else None, "iterations": len(values),
              "gpu_peak_gib": round(peak, 1)}
    if values:  # iterations far slower than the median: a new bucket's compile (or the loader catching up)
        median = statistics.median(values)
        slow = {i: rows[i]["images_per_s"] for i in range(1, last + 1) if i in rows and rows[i]["images_per_s"] < median / 2}
        result["slow_iterations_s"] = {i: round(batch / v, 1) for i, v in slow.items()}
        waits = [rows[i]["loader_wait"] for i in range(first, last + 1) if "loader_wait" in rows.get(i, {})]
        if waits:  # the share of each iteration spent waiting for the next batch
            result["loader_wait_median"] = round(statistics.median(waits), 3)
    return result


def save_seconds(log: Path) -> float | None:
    """Seconds between the last iteration line before the first checkpoint line and that checkpoint line."""
    import re

    last_iter, stamp = None, re.compile(r"^(\d\d):(\d\d):(\d\d) ")
    for line in log.read_text(errors="replace").splitlines():
        match = stamp.match(line)
        if not match:
            continue
        seconds = int(match[1]) * 3600 + int(match[2]) * 60 + int(match[3])
        if " iter " in line:
            last_iter = seconds
        elif ": checkpoint " in line and last_iter is not None:
            return float((seconds - last_iter) % 86400)
    return None


GENERATE = r"""
import json, sys, time, torch
from diffusers import StableDiffusionXLPipeline
folder, out, steps, size, levers = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "levers"
lora = sys.argv[6] if len(sys.argv) > 6 else None
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.bfloat16 if device == "cuda" else torch.float32
start = time.time()
pipe = StableDiffusionXLPipeline.from_pretrained(folder, torch_dtype=dtype).to(device)
if lora:  # a LoRA export: the base pipeline with the adapter, as a user loads it
    pipe.load_lora_weights(lora)
loaded = time.time() - start
pipe(prompt="a photo of a red fox", num_inference_steps=2, guidance_scale=3.0, height=size, width=size)  # warm-up
if device == "cuda":
    torch.cuda.synchronize()
start = time.time()
image = pipe(prompt="a photo of a red fox", num_inference_steps=steps, guidance_scale=3.0, height=size, width=size,
             generator=torch.Generator(device).manual_seed(0), output_type="np").images[0]
if device == "cuda":
    torch.cuda.synchronize()
seconds = time.time() - start
from PIL import Image
import numpy as np
Image.fromarray((np.nan_to_num(image) * 255).round().clip(0, 255).astype("uint8")).save(out)
result = {"scheduler": type(pipe.scheduler).__name__, "load_s": round(loaded, 1), "generate_s": round(seconds, 2),
          "steps": steps, "size": size, "finite": bool(np.isfinite(image).all())}
if levers:  # the speed levers a diffusers user can turn on: fused QKV, channels-last, cuDNN attention, regional compile
    from torch.nn.attention import SDPBackend, sdpa_kernel
    pipe.fuse_qkv_projections()
    pipe.unet.to(memory_format=torch.channels_last)
    pipe.unet.compile_repeated_blocks(fullgraph=True)
    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    timings = {}
    with sdpa_kernel(order, set_priority=True):
        for name, n in (("compile_s", 2), ("generate_levers_s", steps)):  # the first call compiles
            start = time.time()
            fast = pipe(prompt="a photo of a red fox", num_inference_steps=n, guidance_scale=3.0, height=size, width=size,
                        generator=torch.Generator(device).manual_seed(0), output_type="np").images[0]
            torch.cuda.synchronize()
            timings[name] = round(time.time() - start, 2)
    result.update(timings, levers_max_abs_difference=round(float(np.abs(fast - image).max()), 4))
result["pgv25_imported"] = any(m.split(".")[0] == "pgv25" for m in sys.modules)
print(json.dumps(result))
"""


def stage_generate(export: Path, out_png: Path, steps: int, size: int, timeout: float, base: Path | None = None) -> dict:
    """Plain diffusers on the export (or, for a LoRA export, on `base` with the LoRA loaded)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")  # no repo on the path: plain diffusers only
    folders = [str(base), str(export)] if base is not None else [str(export)]
    import torch

    levers = "levers" if torch.cuda.is_available() else "eager"  # compiling needs the GPU it is measured on
    done = subprocess.run([sys.executable, "-c", GENERATE, folders[0], str(out_png), str(steps), str(size), levers, *folders[1:]],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd="/")
    if done.returncode != 0:
        return {"error": f"exit {done.returncode}: {done.stderr.strip().splitlines()[-1:]}", "export": str(export)}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["export"] = str(export)
    if result["pgv25_imported"]:
        result["error"] = "pgv25 was imported by the plain-diffusers process"
    return result


def stage_bench(args, log: Path, timeout: float) -> dict:
    command = [sys.executable, str(TOOLS / "bench_train.py"), "--variants", *args.bench_variants, "--batch", str(args.bench_batch or args.batch),
               "--size", f"{args.resolution}x{args.resolution}", "--steps", str(args.bench_steps), "--warmup",
               str(args.bench_warmup), "--rounds", str(args.bench_rounds)]
    if args.small:
        command += ["--arch", "tiny", "--latent-factor", "4"]
    rows, start = [], time.time()
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=out, text=True, env=child_env(), start_new_session=True)
        try:
            for line in process.stdout:
                out.write(line)
                out.flush()
                if line.startswith("{"):  # a row (with rounds: each round's, then the medians)
                    rows.append(json.loads(line))
                    print("  bench:", line.strip(), flush=True)
                elif line.startswith("round "):
                    print("  bench", line.strip(), flush=True)
                if time.time() - start > timeout:
                    raise TimeoutError
            process.wait()
        except TimeoutError:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return {"rows": rows, "error": f"stopped after {timeout:.0f} s with {len(rows)} of {len(args.bench_variants)} rows"}
    result = {"rows": rows}
    if process.returncode != 0:
        result["error"] = f"exit {process.returncode}: {tail(log, 1)}"
    return result


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def stage_generate_pgv25(model: Path, size: int, steps: int, images: int, timeout: float, log: Path) -> dict:
    """Seconds per image through pgv25's generate path (tools/bench_generate.py): with `pgv25 generate`'s levers
    (fused QKV, channels-last, cuDNN attention: its GPU default), then with its transformer blocks compiled
    (`--compile`; the first image pays the compile)."""
    import torch

    cuda = torch.cuda.is_available()
    command = [sys.executable, str(TOOLS / "bench_generate.py"), "--model", str(model), "--size", str(size), "--steps",
               str(steps), "--images", str(images), "--variants", "levers", "levers+compile"]
    if not cuda:  # inductor on a CPU takes minutes: the compiled path's code, not its speed
        command += ["--compile-backend", "eager"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=child_env())
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    log.write_text(done.stdout + done.stderr)
    rows = {r["variant"]: r for r in json_lines(done.stdout)}
    result = {f"{name}_s": round(r["seconds_per_image"], 3) for name, r in rows.items()}
    result.update({f"{name}_first_s": round(r["first_image_s"], 2) for name, r in rows.items()}, size=size, steps=steps)
    if done.returncode != 0 or len(rows) < 2:
        result["error"] = f"exit {done.returncode}: {tail(log, 1)}"
    return result


MJHQ_IMAGES = 30_000


def stage_eval_generate(model: Path, work: Path, size: int, steps: int, count: int, timeout: float, log: Path,
                        batch: int = 1, compile_blocks: bool = False) -> dict:
    """`pgv25 eval generate` on `count` prompts in MJHQ-30K's layout, `batch` prompts per pipeline call. Its images/s
    is read from the images' write times once the first batch is out (loading, the warm-up and any compile left out),
    and MJHQ-30K's 30,000 images on 8 such GPUs (one process each, `torchrun --nproc-per-node 8`: each GPU makes its
    own share) follow from it."""
    categories, colours = ["people", "animals", "food"], ["red", "blue", "golden", "green"]
    things = ["fox", "teapot", "lighthouse", "bicycle"]
    prompts = {f"{i:03d}": {"category": categories[i % 3], "prompt": f"a photo of a {colours[i % 4]} {things[i // 4 % 4]}, detailed"}
               for i in range(count)}
    meta, out = work / "eval_prompts.json", work / "eval_images"
    meta.write_text(json.dumps(prompts))
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-c", PGV25, "eval", "generate", "--model", str(model), "--prompts", str(meta), "--out", str(out),
               "--steps", str(steps), "--width", str(size), "--height", str(size), "--batch-size", str(batch)]
    command += ["--compile"] if compile_blocks else []
    start = time.time()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=child_env())
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    log.write_text(done.stdout + done.stderr)
    stamps = sorted(f.stat().st_mtime for f in out.glob("*/*.png"))
    result = {"images": len(stamps), "size": size, "steps": steps, "batch": batch, "compiled": compile_blocks,
              "seconds": round(time.time() - start, 1)}
    if done.returncode != 0 or len(stamps) != len(prompts):
        result["error"] = f"exit {done.returncode}, {len(stamps)} of {len(prompts)} images: {tail(log, 1)}"
    if len(stamps) > batch and stamps[-1] > stamps[batch - 1]:
        rate = (len(stamps) - batch) / (stamps[-1] - stamps[batch - 1])
        result.update(images_per_s=round(rate, 3), seconds_per_image=round(1 / rate, 2),
                      mjhq30k_hours_on_8_gpus=round(MJHQ_IMAGES / (8 * rate) / 3600, 2))
    return result


def real_path(args, report: Report, base: Path, images: Path, work: Path, out: Path, optimizer: str) -> Path | None:
    """Stages 4-6: train, kill, verify, generate with plain diffusers, resume. Returns the export (None: no checkpoint)."""
    main_options = args.cfg_options + (variant_options(args.main_variant) if args.main_variant else [])
    lora = "lora" in args.config or "model.lora.enabled=True" in main_options
    first = work / "run"
    result = run_train(args.config, train_options(args, base, images, work, args.iters, optimizer) + main_options, first,
                       out / "train.log",
                       timeout=max(60.0, report.left() - 60), kill_at=args.iters)
    rows = scalars(first)
    checkpoint = first / "checkpoints" / f"iter_{args.checkpoint_at:07d}"
    result.update(optimizer=optimizer, variant=args.main_variant, batch=args.batch, logged_iterations=len(rows),
                  **rates(rows, 2, args.checkpoint_at, args.batch),
                  checkpoint_gib=round(folder_gib(checkpoint), 2), export_gib=round(folder_gib(first / f"step{args.checkpoint_at}"), 2),
                  save_s=save_seconds(out / "train.log"), losses=[rows[i]["loss"] for i in sorted(rows)])
    if args.iters not in rows and not result.get("error"):
        result["error"] = f"iteration {args.iters} never logged"
    report.record("train", result)
    if not checkpoint.is_dir():
        report.record("verify", {"error": f"no checkpoint at {checkpoint}"})
        return None
    for leftover in (first / "checkpoints").glob(".iter_*.tmp*"):  # the save cut off by SIGKILL
        shutil.rmtree(leftover, ignore_errors=True)
    verify = subprocess.run([sys.executable, "-c", PGV25, "ckpt", "verify", str(checkpoint)], capture_output=True, text=True,
                            env=child_env())
    report.record("verify", {"returncode": verify.returncode, "output": verify.stdout.strip()[-600:],
                             **({"error": verify.stderr.strip()[-300:] or "verify failed"} if verify.returncode else {})})

    export = first / f"step{args.checkpoint_at}"
    if "generate" not in args.skip and report.left() > 60:
        try:
            report.record("generate", stage_generate(export, out / "generated.png", args.steps, args.resolution, report.left() - 30,
                                                     base if lora else None))
        except subprocess.TimeoutExpired:
            report.record("generate", {"error": "timed out"})

    if "resume" not in args.skip and report.left() > 90:
        resume_from = checkpoint
        need = folder_gib(checkpoint) + folder_gib(export)
        if free_gib(work) < 1.1 * need and free_gib(Path("/dev/shm")) > 1.1 * folder_gib(checkpoint):
            resume_from = Path("/dev/shm") / checkpoint.name
            shutil.move(str(checkpoint), resume_from)
        second = work / "resumed"
        result = run_train(args.config, train_options(args, base, images, work, args.iters, optimizer) + main_options, second,
                           out / "resume.log",
                           timeout=max(60.0, report.left() - 40), resume=resume_from)
        resumed = scalars(second)
        compared = [i for i in range(args.checkpoint_at + 1, args.iters + 1) if i in rows and i in resumed]
        diffs = [abs(resumed[i]["loss"] - rows[i]["loss"]) / max(abs(rows[i]["loss"]), 1e-12) for i in compared]
        written = second / f"step{args.iters}" / ("pytorch_lora_weights.safetensors" if lora else "model_index.json")
        result.update(resumed_from=str(resume_from), compared_iterations=len(compared),
                      max_relative_loss_difference=max(diffs) if diffs else None, **rates(resumed, args.checkpoint_at + 2, args.iters, args.batch),
                      export=str(second / f"step{args.iters}"), export_written=written.is_file(),
                      save_s=save_seconds(out / "resume.log"))
        if not result.get("error") and (len(compared) < args.iters - args.checkpoint_at or not result["export_written"]):
            result["error"] = f"{len(compared)} iterations compared; export written: {result['export_written']}"
        report.record("resume", result)

    return export


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="where gpu_check.json, the logs and the image go")
    p.add_argument("--work", help="where the base, images, work dirs go (default: the roomiest of /tmp, /root, .)")
    p.add_argument("--budget", type=float, default=540, help="seconds for all stages; a stage that cannot fit is skipped")
    p.add_argument("--small", action="store_true", help="a reduced model of the same layout (for trying this on a CPU)")
    p.add_argument("--config", default="playgroundv2_5_pokemon_blip",
                   help="a full fine-tune or a LoRA config (playgroundv2_5_lora_pokemon_blip: what fits a CPU at full size)")
    p.add_argument("--runner-variants", nargs="*", default=[], type=runner_variant, metavar="VARIANT[@BATCH]",
                   help=f"more short runs of the whole runner (killed at their last iteration, nothing saved): "
                        f"{', '.join(sorted(RUNNER_VARIANTS))}")
    p.add_argument("--runner-timeout", type=float, default=240, help="seconds for each runner variant at most")
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--images", type=int, default=160)
    p.add_argument("--square", action="store_true", help="square images only (one bucket: like for like with the bare "
                   "step, no recompile per new bucket shape)")
    p.add_argument("--checkpoint-at", type=int, default=20)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--steps", type=int, default=50, help="generation steps")
    p.add_argument("--bpe", help="CLIP's bpe_simple_vocab_16e6.txt.gz (default: from an installed open_clip)")
    p.add_argument("--bench-variants", nargs="+", default=LEVER_VARIANTS)
    p.add_argument("--bench-batch", type=int, help="the bench's batch (default: --batch)")
    p.add_argument("--bench-rounds", type=int, default=1, help="interleaved rounds (each row the median, with its spread)")
    p.add_argument("--bench-steps", type=int, default=5)
    p.add_argument("--bench-warmup", type=int, default=2)
    p.add_argument("--bench-timeout", type=float, help="seconds for the bench at most (default: what the runners leave)")
    p.add_argument("--eval-images", type=int, default=6, help="images for eval_generate")
    p.add_argument("--eval-batch", type=int, default=1, help="prompts per pipeline call in eval_generate (--batch-size)")
    p.add_argument("--eval-compile", action="store_true", help="eval_generate with its transformer blocks compiled")
    p.add_argument("--skip", nargs="*", default=[], choices=STAGES)
    p.add_argument("--cfg-options", nargs="+", default=[], help="KEY=VALUE for the main run and its resume (e.g. the levers "
                   "of the ≤ 12 GiB full fine-tune: model.trained_dtype=bf16 optim_wrapper.fused_backward=True ...)")
    p.add_argument("--main-variant", choices=sorted(RUNNER_VARIANTS), help="the levers of one runner variant for the main "
                   "run and its resume (e.g. bf16_adafactor_fused: the full fine-tune that fits 16 GB)")
    p.add_argument("--runner-iters", type=int, help="iterations of each runner variant (default: max(8, checkpoint-at / 2))")
    args = p.parse_args(argv)
    import torch

    from pgv25.cli import quiet_libraries

    quiet_libraries()  # the libraries' chatter (torchao's deprecation warnings, bitsandbytes' kernel lookup) off the log
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = Path(args.out).resolve()  # the generation subprocess runs in another folder
    out.mkdir(parents=True, exist_ok=True)
    candidates = [Path(c) for c in ("/tmp", "/root", ".") if Path(c).is_dir()]
    work = Path(args.work).resolve() if args.work else max(candidates, key=free_gib).resolve() / "pgv25_gpu_check"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    report = Report(out, args.budget)
    report.record("env", stage_env(work))
    base, images = work / "base", work / "images"
    start = time.time()
    report.record("base", {**stage_base(base, device, args.small, args.bpe), "total_s": round(time.time() - start, 1)})
    start = time.time()
    ratios = [(1024, 1024)] if args.square else RATIOS
    report.record("images", {**stage_images(images, args.images, args.resolution, ratios), "seconds": round(time.time() - start, 1)})

    # Optimizer: AdamW, unless the disk cannot take one full checkpoint + export beside the base.
    unet_params = report.data["stages"]["base"]["parameters"]["unet"]
    adamw_gib = unet_params * (4 + 8 + 2) / GIB
    optimizer = "AdamW" if free_gib(work) > 1.1 * adamw_gib else "Adafactor"
    model = base  # what the generation stages load: the export of the main run when there is one
    if "train" not in args.skip:
        model = real_path(args, report, base, images, work, out, optimizer) or base

    # The bare steps before the runner variants: every runner figure is read against them.
    runner_reserve = 90 * len(args.runner_variants) + 60 * sum(stage not in args.skip for stage in ("generate_pgv25", "eval_generate"))
    if "bench" not in args.skip and report.left() > 60:
        timeout = args.bench_timeout or report.left() - 10 - runner_reserve
        report.record("bench", stage_bench(args, out / "bench.log", min(timeout, report.left() - 10)))
    for name, batch in args.runner_variants:
        stage = f"runner_{name}" + (f"@{batch}" if batch else "")
        if report.left() < 90:
            report.record(stage, {"error": "skipped: no time left"})
            continue
        iters = args.runner_iters or max(8, args.checkpoint_at // 2)
        folder = work / stage.replace("@", "_b")
        options = train_options(args, base, images, work, iters, optimizer, batch) + args.cfg_options + variant_options(name)
        result = run_train(args.config, options, folder, work / f"{folder.name}.log",  # $OUT takes 8 files
                           timeout=min(args.runner_timeout, report.left() - 30), kill_at=iters)
        rows = scalars(folder)
        result.update(batch=batch or args.batch, **rates(rows, 3, iters, batch or args.batch),
                      losses=[rows[i]["loss"] for i in sorted(rows)])
        shutil.rmtree(folder, ignore_errors=True)
        report.record(stage, result)

    # Generation through pgv25, on the export (or the base: random weights cost what trained ones do)
    if "generate_pgv25" not in args.skip:
        if report.left() > 60:
            report.record("generate_pgv25", stage_generate_pgv25(model, args.resolution, args.steps, 2, report.left() - 20,
                                                                 work / "generate_pgv25.log"))
        else:
            report.record("generate_pgv25", {"error": "skipped: no time left"})
    if "eval_generate" not in args.skip:
        if report.left() > 45:
            report.record("eval_generate", stage_eval_generate(model, work, args.resolution, args.steps, args.eval_images,
                                                               report.left() - 10, work / "eval_generate.log",
                                                               args.eval_batch, args.eval_compile))
        else:
            report.record("eval_generate", {"error": "skipped: no time left"})
    return finish(report)


def bare_variant(stage: str) -> str:
    """The bench row a runner stage is read against: the bare step with the same levers (the GPU defaults; none for
    `eager`) and the same optimizer (the bench's `adamw8bit` row for the 8-bit runner)."""
    name = stage.removeprefix("runner_").partition("@")[0]
    return {"eager": "full", "adamw8bit": DEFAULTS_VARIANT.replace("full", "adamw8bit", 1)}.get(name, DEFAULTS_VARIANT)


def runner_ratios(stages: dict) -> dict:
    """Each runner's images/s over its bare step's, at the bench's batch (other batches have no bare step here)."""
    rows = {r["variant"]: r for r in stages.get("bench", {}).get("rows", []) if "images_per_s" in r}
    ratios = {}
    for stage, result in stages.items():
        if stage != "train" and not stage.startswith("runner_"):
            continue
        row, rate = rows.get(bare_variant(stage)), result.get("images_per_s_median")
        if rate and row and result.get("batch", row["batch"]) == row["batch"]:
            ratios[f"{stage} / {row['variant']}"] = round(rate / row["images_per_s"], 3)
    return ratios


def float8_against_bf16(stages: dict) -> dict | None:
    """FP8's runner against the bf16 one over the same steps (same seed: the same batches, σ and noise): speed, and
    each logged loss's relative difference."""
    fp8, bf16 = stages.get("runner_float8", {}), stages.get("runner_cache", {})
    if not (fp8.get("images_per_s_median") and bf16.get("images_per_s_median")):
        return None
    pairs = list(zip(fp8.get("losses", []), bf16.get("losses", [])))
    diffs = [abs(a - b) / max(abs(b), 1e-12) for a, b in pairs]
    return {"speed_ratio": round(fp8["images_per_s_median"] / bf16["images_per_s_median"], 3), "compared_losses": len(pairs),
            "max_relative_loss_difference": round(max(diffs), 4) if diffs else None,
            "median_relative_loss_difference": round(statistics.median(diffs), 4) if diffs else None}


def summary_row(data: dict, date: str) -> str:
    """docs/performance.md's summary row for this call: | card | date | full FT images/s | batch | × reference |
    runner ÷ bare step | 24 GB runner peak GiB | generation s |, blank where this call measured nothing."""
    stages = data["stages"]
    card = (stages.get("env", {}).get("gpu") or "CPU").removeprefix("NVIDIA ")
    row = next((r for r in stages.get("bench", {}).get("rows", []) if r.get("variant") == DEFAULTS_VARIANT and "images_per_s" in r), None)
    cells = [card, date, "", "", "", "", "", ""]
    if row:
        rounds = row.get("rounds", 1)
        spread = f" ({rounds} rounds, spread {row['spread']:.0%})" if rounds > 1 else " (1 round)"
        cells[2], cells[3] = f"{row['images_per_s']:.2f}{spread}", str(row["batch"])
        if "speedup_vs_reference" in row:
            cells[4] = f"{row['speedup_vs_reference']:.2f}"
    ratios = data.get("runner_vs_bare_step") or {}
    runner = next((f"{v:.2f} ({k.split(' /')[0].removeprefix('runner_')})" for k, v in ratios.items()
                   if k.startswith(("runner_cache ", "train "))), "")
    cells[5] = runner
    small = [(stage, r) for stage, r in stages.items() if r.get("gpu_peak_gib") and not r.get("error")
             and (stage.startswith("runner_24gb") or (stage == "train" and r.get("variant") == "24gb"))]
    if small:
        stage, r = min(small, key=lambda item: item[1]["batch"])
        planned = f", planned {r['planned_gib']:.1f}" if r.get("planned_gib") else ""
        cells[6] = f"{r['gpu_peak_gib']:.1f} (batch {r['batch']}{planned})"
    generation = stages.get("generate_pgv25", {})
    if generation.get("levers_s"):
        compiled = f"; {generation['levers+compile_s']:.2f} compiled" if generation.get("levers+compile_s") else ""
        cells[7] = f"{generation['levers_s']:.2f} (pgv25 generate{compiled})"
    return "| " + " | ".join(cells) + " |"


def finish(report: Report) -> int:
    data = report.data
    ratios = runner_ratios(data["stages"])
    if ratios:
        data["runner_vs_bare_step"] = ratios
    float8 = float8_against_bf16(data["stages"])
    if float8:
        data["float8_vs_bf16"] = float8
    row = summary_row(data, time.strftime("%Y-%m-%d", time.gmtime()))
    (report.out / "summary_row.md").write_text(row + "\n")
    report.record("summary", {"failures": data["failures"], "runner_vs_bare_step": data.get("runner_vs_bare_step"),
                              "float8_vs_bf16": float8, "summary_row": row})
    return 1 if data["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
