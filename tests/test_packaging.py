"""Installed from a wheel, not editable, pgv25 still finds its configs, from any folder."""

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # launches processes or builds venvs: the full suite only (pytest -m 'not slow' skips it)

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "pgv25", "configs")


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory):
    """A fresh venv with pgv25 installed from a wheel built from a copy of the sources.

    The venv borrows this environment's dependencies through a .pth line (installing torch and the rest
    again would take minutes); that line adds the folder to sys.path without running its .pth files, so
    the editable install of this checkout is not visible there.
    """
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    built = subprocess.run([*pip, "wheel", "--no-deps", "-q", "-w", str(tmp / "dist"), str(src)],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    (wheel,) = (tmp / "dist").glob("pgv25-*.whl")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib, "borrowed_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    installed = subprocess.run([*pip, "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
                               capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stdout[-2000:] + installed.stderr[-2000:]
    elsewhere = tmp / "elsewhere"  # no configs/ here, and not the checkout
    elsewhere.mkdir()
    return venv, elsewhere


def pgv25(wheel_env, *args):
    venv, cwd = wheel_env
    env = {k: v for k, v in os.environ.items() if k not in ("PGV25_CONFIG_DIR", "PYTHONPATH")}
    return subprocess.run([str(venv / "bin" / "pgv25"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_the_wheel_is_what_runs(wheel_env):
    venv, cwd = wheel_env
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import pgv25; print(pgv25.__file__)"], cwd=cwd,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where).is_relative_to(venv), f"pgv25 imported from {where}, not the wheel"


def test_list_cfg_finds_every_config_of_the_checkout(wheel_env):
    result = pgv25(wheel_env, "list-cfg")
    assert result.returncode == 0, result.stderr
    listed = {line.split()[0]: Path(line.split()[1]) for line in result.stdout.splitlines()}
    shipped = {p.stem for p in (ROOT / "configs").rglob("*.py") if "_base_" not in p.parts}
    assert set(listed) == shipped
    assert all(".mim" in path.parts and path.is_file() for path in listed.values())


def test_train_dry_run_and_copy_cfg_from_another_folder(wheel_env):
    result = pgv25(wheel_env, "train", "playgroundv2_5_tiny_shapes", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "max_iters=2800" in result.stdout and "tiny_shapes/playground-v2.5-tiny" in result.stdout
    copied = pgv25(wheel_env, "copy-cfg", "playgroundv2_5_pokemon_blip", "mine.py")
    assert copied.returncode == 0, copied.stderr
    assert "playgroundai/playground-v2.5-1024px-aesthetic" in (wheel_env[1] / "mine.py").read_text()
