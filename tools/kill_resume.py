"""Kill a CPU training run with SIGKILL at random moments, resume it each time, compare with an uninterrupted run.

    python tools/kill_resume.py --kills 25 --iters 200 --interval 2 [--nproc 2] [--work /tmp/kill_resume]

1. Trains the tiny config for --iters iterations without interruption (the reference) and times its
   start-up and iterations.
2. Starts the same run with `--resume` in another work dir and SIGKILLs the whole process tree; repeats
   until --kills kills have landed, then lets it finish. Odd-numbered kills come after a random delay
   (start-up plus up to a few checkpoint intervals: anywhere in start-up, steps or saves); even-numbered
   ones are aimed at saves, alternately checkpoints and exports: a random 0-50 ms after the attempt
   starts writing one.
3. Reports, as one JSON line: kills, how many hit a save in progress (a temporary checkpoint or export
   folder was left behind), whether every restart resumed without an error, and whether the final UNet
   weights and the logged per-iteration losses equal the reference bit for bit.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

CONFIG = "playgroundv2_5_tiny_shapes"


def command(work: Path, args) -> list[str]:
    options = [f"train_cfg.max_iters={args.iters}", f"default_hooks.checkpoint.interval={args.interval}",
               f"train_dataloader.batch_size={args.batch}", "default_hooks.logger.interval=1", "sample_grid.prompts=[]",
               "validation.interval=0"]
    return [sys.executable, "-m", "pgv25.cli", "train", CONFIG, "--work-dir", str(work), "--resume", "--cfg-options", *options]


def environment(args) -> dict:
    env = dict(os.environ)
    if args.nproc > 1:
        env["NPROC_PER_NODE"] = str(args.nproc)
    return env


def descendants(pid: int) -> list[int]:
    from pgv25.launch import children

    found, frontier = [], [pid]
    while frontier:
        frontier = [child for parent in frontier for child in children(parent)]
        found += frontier
    return found


def kill_tree(process: subprocess.Popen) -> None:
    for pid in [process.pid, *descendants(process.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait()


SAVES = (("checkpoint", "checkpoints/.iter_*.tmp*"), ("export", ".step*.tmp*"))


def saving(work: Path, since: float, kinds=("checkpoint", "export")) -> str | None:
    """'checkpoint' or 'export' when a temporary folder created after `since` exists (a save in progress)."""
    for kind, pattern in SAVES:
        if kind not in kinds:
            continue
        for path in work.glob(pattern):
            try:
                if path.stat().st_mtime >= since:
                    return kind
            except FileNotFoundError:  # renamed in the meantime: that save completed
                pass
    return None


def wait_for_save(process: subprocess.Popen, work: Path, since: float, kind: str, timeout: float) -> None:
    deadline = time.time() + timeout
    while process.poll() is None and time.time() < deadline and saving(work, since, (kind,)) is None:
        time.sleep(0.005)


def unet(work: Path, iters: int) -> dict:
    from safetensors.torch import load_file

    return load_file(work / f"step{iters}" / "unet" / "diffusion_pytorch_model.safetensors")


def losses(work: Path) -> list:
    rows = map(json.loads, (work / "scalars.jsonl").read_text().splitlines())
    return [(r["iteration"], r["loss"], r["grad_norm"]) for r in rows if "loss" in r]  # not validation.loss's lines


def ensure_assets() -> None:
    """Build the tiny config's cached assets first, so that no timed or killed start-up includes building them."""
    from pgv25.cli import quiet_libraries, quiet_progress_bars
    from pgv25.config import load_config
    from pgv25.tiny import ensure_tiny_assets

    quiet_libraries()
    quiet_progress_bars()
    ensure_tiny_assets(**load_config(CONFIG).tiny_assets)


def timed_reference(work: Path, args, log) -> tuple[float, float]:
    """Run the reference; returns (seconds to the first logged iteration, seconds per iteration)."""
    start = time.time()
    process = subprocess.Popen(command(work, args), env=environment(args), stdout=log, stderr=subprocess.STDOUT)
    scalars, first = work / "scalars.jsonl", None
    while process.poll() is None:
        if first is None and scalars.is_file() and scalars.read_text():
            first = time.time() - start
        time.sleep(0.05)
    if process.returncode != 0:
        sys.exit(f"reference run failed (exit {process.returncode}); see {log.name}")
    total = time.time() - start
    first = first or total
    return first, max((total - first) / max(args.iters - 1, 1), 1e-3)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=25)
    p.add_argument("--iters", type=int, default=200, help="long enough that --kills kills land before the end")
    p.add_argument("--interval", type=int, default=2, help="checkpoint (and export) interval")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--nproc", type=int, default=1, help="processes (NPROC_PER_NODE)")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill times")
    p.add_argument("--work", default="/tmp/kill_resume")
    args = p.parse_args()
    rng = random.Random(args.seed)
    root = Path(args.work)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    reference, killed = root / "reference", root / "killed"
    ensure_assets()

    with open(root / "reference.log", "w") as log:
        startup, per_iter = timed_reference(reference, args, log)
    window = 4 * args.interval * per_iter  # a few checkpoint intervals of training after start-up
    print(f"reference: start-up {startup:.1f} s, {per_iter * 1000:.0f} ms/iteration; killing within "
          f"{startup * 0.5:.1f}..{startup + window:.1f} s of each start", flush=True)

    kills = errors = attempts = 0
    mid_save = {"checkpoint": 0, "export": 0}
    finished = False
    while not finished:
        attempts += 1
        log_path = root / f"attempt{attempts:03d}.log"
        with open(log_path, "w") as log:
            started = time.time()
            process = subprocess.Popen(command(killed, args), env=environment(args), stdout=log, stderr=subprocess.STDOUT)
            if kills < args.kills and kills % 2 == 1:  # the next kill is even-numbered: aim at a save
                target = "checkpoint" if kills % 4 == 1 else "export"
                wait_for_save(process, killed, started, target, timeout=3 * startup + window)
                time.sleep(rng.uniform(0, 0.05))
            elif kills < args.kills:
                time.sleep(rng.uniform(startup * 0.5, startup + window))
            if kills < args.kills and process.poll() is None:
                kill_tree(process)
                kills += 1
                state = "training or start-up"
                kind = saving(killed, started)  # this attempt's half-written save
                if kind:
                    mid_save[kind] += 1
                    state = f"mid-{kind}"
                print(f"kill {kills}: {state}, latest complete {latest(killed)}", flush=True)
            else:
                finished = process.wait() == 0
                if not finished:
                    print(f"attempt {attempts} exited {process.returncode}; see {log_path}", flush=True)
        text = log_path.read_text()
        errors += "error" in text.lower() and "Traceback" not in text  # a resume that refused to start
        if "Traceback" in text or (not finished and process.returncode not in (-9, 0)):
            print(f"attempt {attempts} failed; see {log_path}", flush=True)
            return 1

    a, b = unet(reference, args.iters), unet(killed, args.iters)
    import torch

    report = {
        "kills": kills, "kills_mid_checkpoint": mid_save["checkpoint"], "kills_mid_export": mid_save["export"], "restarts": attempts - 1, "resume_errors": errors,
        "processes": args.nproc, "iterations": args.iters, "checkpoint_interval": args.interval,
        "weights_identical": a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a),
        "losses_identical": losses(reference) == losses(killed),
    }
    print(json.dumps(report))
    enough = kills >= args.kills
    if not enough:
        print(f"the run finished after {kills} kills; raise --iters to land {args.kills}", flush=True)
    return 0 if enough and report["weights_identical"] and report["losses_identical"] and not errors else 1


def latest(work: Path) -> str:
    done = sorted(p.name for p in (work / "checkpoints").glob("iter_*")) if (work / "checkpoints").is_dir() else []
    return done[-1] if done else "none"


if __name__ == "__main__":
    sys.exit(main())
