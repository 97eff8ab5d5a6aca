"""Wheels for a GPU machine that has torch but nothing else and no network: what `tools/gpu_check.py` and the
benchmarks import, at the versions of constraints.txt, for its Python, into a folder that travels with the call.

    python tools/device_wheels.py                       # .whl/, Python 3.12, CUDA 13.0 (the lent H100/H200 machines)
    python tools/device_wheels.py --no-8bit             # without bitsandbytes
    python tools/device_wheels.py --no-float8           # without torchao (model.float8; 3.4 MB)
    # on the GPU machine:
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site

Everything travelling with a call, the working tree included, must fit in 64 MiB. bitsandbytes (8-bit AdamW) ships
one native library per CUDA and ROCm version, 43 MB in all. Its wheel is rewritten with the CPU library and the
one for `--cuda` only, and its RECORD is updated to match.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import re
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# What pgv25 and the tools import beyond torch, numpy, PIL and safetensors (already on the GPU machine).
PACKAGES = ["diffusers", "transformers", "peft", "mmengine", "yapf", "termcolor", "addict", "platformdirs", "datasets",
            "dill", "multiprocess", "open_clip_torch"]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64"]
NATIVE = re.compile(r"bitsandbytes/libbitsandbytes_(\w+)\.so$")


def pinned(name: str) -> str:
    """`name==version` from constraints.txt when it pins the package, else the bare name."""
    key = name.lower().replace("_", "-")
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.split("==")[0].strip().lower().replace("_", "-") == key:
            return line.strip()
    return name


def download(names: list[str], dest: Path, python: str) -> None:
    # every manylinux tag the GPU machine's glibc (2.39) takes: an older pip matches --platform exactly
    # (bitsandbytes 0.50.2 is tagged manylinux_2_24 only)
    platforms = [arg for tag in PLATFORMS for arg in ("--platform", tag)]
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", *platforms,
                    "--python-version", python, "--dest", str(dest), *map(pinned, names)], check=True)


def record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def slim(wheel: Path, keep: set[str]) -> tuple[int, int]:
    """Rewrite `wheel` without the native libraries whose variant is not in `keep`; (bytes before, bytes after)."""
    before = wheel.stat().st_size
    slimmed = wheel.with_suffix(".slim")
    with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(slimmed, "w", zipfile.ZIP_DEFLATED) as target:
        dropped = {i.filename for i in source.infolist() if (m := NATIVE.search(i.filename)) and m[1] not in keep}
        for info in source.infolist():
            if info.filename in dropped:
                continue
            data = source.read(info.filename)
            if info.filename.endswith(".dist-info/RECORD"):  # pip checks the files it installs against RECORD
                lines = [line for line in data.decode().splitlines() if line.split(",")[0] not in dropped]
                data = ("\n".join(lines) + "\n").encode()
            target.writestr(info, data)
    slimmed.replace(wheel)
    return before, wheel.stat().st_size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dest", default=str(REPO / ".whl"))
    parser.add_argument("--python", default="3.12", help="the GPU machine's Python")
    parser.add_argument("--cuda", default="130", help="the GPU machine's CUDA, as bitsandbytes names it (130: 13.0)")
    parser.add_argument("--no-8bit", action="store_true", help="leave bitsandbytes out")
    parser.add_argument("--no-float8", action="store_true", help="leave torchao out")
    args = parser.parse_args(argv)
    dest = Path(args.dest)
    dest.mkdir(parents=True, exist_ok=True)
    download(PACKAGES + ([] if args.no_8bit else ["bitsandbytes"]) + ([] if args.no_float8 else ["torchao"]), dest, args.python)
    for wheel in dest.glob("bitsandbytes-*.whl"):
        before, after = slim(wheel, {"cpu", f"cuda{args.cuda}"})
        print(f"{wheel.name}: {before / 1e6:.1f} MB -> {after / 1e6:.1f} MB (CPU and CUDA {args.cuda} libraries kept)")
    total = sum(w.stat().st_size for w in dest.glob("*.whl"))
    print(f"{len(list(dest.glob('*.whl')))} wheels, {total / 2**20:.1f} MiB in {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
