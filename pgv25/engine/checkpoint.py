"""Resumable checkpoints that never unpickle arbitrary objects and are never seen half-written.

Layout of `checkpoints/iter_<N>/`:
- `model.safetensors`: the full trainable weights, keyed by parameter name;
- `ema.safetensors`: their exponential moving average, when the run keeps one;
- `optimizer.pt`, `lr_scheduler.pt`, `grad_scaler.pt` (fp16 runs), `rng.pt` (every RNG of every
  rank): tensors, numbers and strings only, read back with `torch.load(weights_only=True)`;
- `trainer_state.json`: iteration, per-rank data position, counters, the config fingerprint;
- `pgv25_manifest.json`: every file's size and SHA-256 (integrity.py), written last.

A checkpoint is written under a temporary name, fsync'ed, and renamed when complete; a `kill -9`
at any moment leaves at worst a temporary folder, which is never picked and is removed by the next
save. Older checkpoints are deleted only after a newer one is complete. A checkpoint damaged later
(a truncated copy, a full disk during a sync) fails its manifest and is passed over on `--resume`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..errors import UserError
from .integrity import CHECKPOINT_DIR, STATE_FILE, finish_folder

TEMP_GLOB = ".iter_*.tmp*"
PICKLED = ("optimizer", "lr_scheduler", "grad_scaler", "rng")  # saved as <name>.pt when present


def rng_state(generator: torch.Generator, rounding: torch.Generator | None = None) -> dict:
    """Every RNG this process draws from, as tensors and plain numbers (`rounding`: stochastic rounding's)."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "mt": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss, "cached": cached},
        "torch": torch.get_rng_state(),
        "generator": generator.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if rounding is not None:
        state["rounding"] = rounding.get_state()
    return state


def set_rng_state(state: dict, generator: torch.Generator, rounding: torch.Generator | None = None) -> None:
    python = state["python"]
    random.setstate((python["version"], tuple(python["mt"].tolist()), python["gauss"]))
    numpy = state["numpy"]
    np.random.set_state((numpy["kind"], numpy["keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"], numpy["cached"]))
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if rounding is not None and "rounding" in state:  # (a checkpoint of fp32 weights has none: the stream starts afresh)
        rounding.set_state(state["rounding"])


def _fsync(path: Path) -> None:
    """Flush a file or a directory entry to disk (a rename is durable only once its folder is synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(folder: Path, iteration: int, model_state: dict, parts: dict, trainer_state: dict, keep: int | None = None) -> Path:
    """Write `folder/iter_<iteration>` atomically, then keep only the newest `keep`; returns its path.

    `parts` maps the names in PICKLED to state dicts, and "ema" to EMA weights (absent or None: not saved).
    """
    final = folder / f"iter_{iteration:07d}"
    tmp = folder / f".iter_{iteration:07d}.tmp{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob(TEMP_GLOB):  # left by a run killed mid-save
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
        save_file({k: v.detach().contiguous().cpu() for k, v in model_state.items()}, tmp / "model.safetensors")
        if parts.get("ema") is not None:
            save_file({k: v.contiguous() for k, v in parts["ema"].items()}, tmp / "ema.safetensors")
        for name in PICKLED:
            if parts.get(name) is not None:
                torch.save(parts[name], tmp / f"{name}.pt")
        (tmp / STATE_FILE).write_text(json.dumps({"iteration": iteration, **trainer_state}, indent=2))
        finish_folder(tmp)
        for file in tmp.iterdir():
            _fsync(file)
        if final.exists():  # re-saving the same iteration (resumed at max_iters)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync(folder)
    except OSError as error:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"cannot write checkpoint {final}: {error.strerror or error}; the previous checkpoint is intact") from None
    if keep and keep > 0:
        for old in complete_checkpoints(folder)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def complete_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints in `folder`, oldest first (temporary folders are never matched)."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CHECKPOINT_DIR.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(folder: Path) -> Path | None:
    found = complete_checkpoints(folder)
    return found[-1] if found else None


def read_trainer_state(path: Path) -> dict:
    try:
        return json.loads((path / STATE_FILE).read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"cannot resume from {path}: {STATE_FILE} is unreadable ({error})") from None


class WeightsFile(Mapping):
    """A checkpoint's weights as a mapping read one tensor at a time: a full-size UNet's 5–10 GB never sit in
    memory beside the parameters they are copied into. A tensor that cannot be read is a one-line ValueError."""

    def __init__(self, path: Path):
        self.path = path
        with safe_open(str(path), framework="pt") as file:  # the header: a damaged one fails here, before any copy
            self._keys = list(file.keys())

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._keys:
            raise KeyError(key)
        try:
            with safe_open(str(self.path), framework="pt") as file:
                return file.get_tensor(key)
        except Exception as error:  # noqa: BLE001 — safetensors' own error type
            raise ValueError(f"{self.path.name}: {key} is unreadable ({str(error).strip()[:160]})") from None

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def read_checkpoint(path: Path, weights: bool = True, lazy: bool = False) -> tuple[dict, dict]:
    """(model weights, {part name: state}) of a checkpoint; only tensors and plain data are unpickled.

    `weights=False` skips the large parts (model and optimizer state: empty dicts) for ranks that
    receive them by broadcast; `lazy`: the weights as a WeightsFile, read as they are copied.
    """
    names = PICKLED if weights else tuple(n for n in PICKLED if n != "optimizer")
    model_state = _read(path / "model.safetensors", WeightsFile if lazy else load_file) if weights else {}
    parts = {name: _read(path / f"{name}.pt", lambda p: torch.load(p, weights_only=True))
             for name in names if (path / f"{name}.pt").is_file()}
    parts.setdefault("optimizer", {})
    if weights and (path / "ema.safetensors").is_file():
        parts["ema"] = _read(path / "ema.safetensors", load_file)
    return model_state, parts


def _read(file: Path, reader):
    """`reader(file)`, any failure (safetensors' own errors included) as one line naming the file."""
    try:
        return reader(file)
    except Exception as error:  # noqa: BLE001 — OSError, pickle's and safetensors' own error types alike
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"cannot resume from {file.parent}: {file.name} is unreadable ({detail})") from None
