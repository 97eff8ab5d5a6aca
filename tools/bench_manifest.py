"""How long the checkpoint manifest's hashing takes: one SHA-256 per file on one thread (manifest version 1) against
256 MiB blocks on every core (version 2), on a folder shaped like a full-size checkpoint (one file twice the size of
another, plus small ones). The files are written first, so both read them from the page cache, as a save does.

    python tools/bench_manifest.py --gib 4            # 2.7 + 1.3 GiB and three small files under /tmp
    python tools/bench_manifest.py --gib 29 --dir /dev/shm/bench   # the H200's full-size checkpoint
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pgv25.engine.integrity import check_folder, digests, sha256  # noqa: E402


def write_folder(root: Path, gib: float) -> dict[str, int]:
    """optimizer.bin (2/3 of the bytes), model.safetensors (1/3), three small files; random bytes."""
    root.mkdir(parents=True, exist_ok=True)
    sizes = {"optimizer.bin": int(gib * 2**30 * 2 / 3), "model.safetensors": int(gib * 2**30 / 3),
             "random_states_0.pkl": 15_000, "scheduler.bin": 1_000, "training_state.json": 600}
    chunk = os.urandom(1 << 24)
    for name, size in sizes.items():
        with open(root / name, "wb") as f:
            left = size
            while left > 0:
                f.write(chunk[: min(left, len(chunk))])
                left -= len(chunk)
    return sizes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gib", type=float, default=4.0)
    parser.add_argument("--dir", default="/tmp/pgv25_bench_manifest")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    root = Path(args.dir)
    sizes = write_folder(root, args.gib)
    results = {"gib": args.gib, "cores": len(os.sched_getaffinity(0)), "whole_file_s": [], "blocks_s": [], "verify_s": []}
    try:
        for _ in range(args.repeats):
            start = time.perf_counter()
            for name in sizes:
                sha256(root / name)
            results["whole_file_s"].append(round(time.perf_counter() - start, 4))
            start = time.perf_counter()
            hashes = digests(root, sizes)
            results["blocks_s"].append(round(time.perf_counter() - start, 4))
        (root / "pgv25_manifest.json").write_text(json.dumps(
            {"version": 2, "files": {n: {"size": s, **hashes[n]} for n, s in sizes.items()}}))
        start = time.perf_counter()
        assert check_folder(root).state == "intact"
        results["verify_s"].append(round(time.perf_counter() - start, 4))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    best = min(results["whole_file_s"]) / max(min(results["blocks_s"]), 1e-4)
    results["speedup"] = round(best, 2)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
