"""Test pyproject.toml's lower bounds: a fresh venv with the oldest allowed version of every dependency, then a fast subset.

    python tools/lower_bounds.py                 # venv in .venv-lower, then the subset below
    python tools/lower_bounds.py --venv /tmp/lo --pytest-args tests/test_edm.py

Every `name>=X` in `[project].dependencies` and the `dev` extra becomes `name==X` in a constraints file;
torch is installed first at its lower bound (pip would otherwise take a newer CUDA build). The subset
covers what each dependency does for pgv25: configs (mmengine), the text encoders and tokenizers
(transformers), the UNet, VAE, schedulers, pipelines and LoRA files (diffusers, peft), datasets and
parquet (datasets, pyarrow), training, checkpoints and resume (accelerate, safetensors), TensorBoard,
and plain-diffusers loading of an export. Exit status: pytest's.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUBSET = ["tests/test_edm.py", "tests/test_config.py", "tests/test_models", "tests/test_data", "tests/test_engine/test_runner.py"]
REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9_.\-]+)\s*(?:\[[^\]]*\])?\s*(.*)$")


def lower_bounds(pyproject: Path = ROOT / "pyproject.toml", extras: tuple[str, ...] = ("dev",)) -> dict[str, str]:
    """{distribution name: its lower bound} for every requirement that has one (`>=X`)."""
    project = tomllib.loads(pyproject.read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in extras:
        requirements += project.get("optional-dependencies", {}).get(extra, [])
    bounds = {}
    for requirement in requirements:
        name, spec = REQUIREMENT.match(requirement.split(";")[0]).groups()
        low = re.search(r">=\s*([^,\s]+)", spec)
        if low:
            bounds[name.lower()] = low.group(1)
    return bounds


def run(*command: str) -> None:
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--venv", default=str(ROOT / ".venv-lower"))
    parser.add_argument("--pytest-args", nargs="+", default=SUBSET)
    args = parser.parse_args(argv)
    bounds = lower_bounds()
    venv = Path(args.venv)
    python = str(venv / "bin" / "python")
    run(sys.executable, "-m", "venv", "--clear", str(venv))
    pip = [python, "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    run(*pip, f"torch=={bounds.pop('torch')}")
    constraints = venv / "lower-bounds.txt"
    constraints.write_text("".join(f"{name}=={version}\n" for name, version in sorted(bounds.items())))
    run(*pip, "-c", str(constraints), "-e", f"{ROOT}[dev]")
    frozen = subprocess.run([python, "-m", "pip", "freeze"], capture_output=True, text=True, check=True).stdout
    installed = {line.split("==")[0].lower().replace("_", "-"): line.split("==")[1] for line in frozen.splitlines() if "==" in line}
    print("tested at the lower bounds:", ", ".join(f"{n}=={installed.get(n.replace('_', '-'), '?')}" for n in sorted(bounds)), flush=True)
    return subprocess.run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args.pytest_args], cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main())
