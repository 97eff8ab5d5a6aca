"""Resumable checkpoints that never unpickle arbitrary objects and are never seen half-written.

Layout of `checkpoints/iter_<N>/`: `model.safetensors` (trainable weights), `optimizer.pt`,
`lr_scheduler.pt`, `rng.pt` (tensors and numbers only, read back with `weights_only=True`) and
`trainer_state.json` (iteration, data position). A checkpoint is written under a temporary name
and renamed when complete, so the newest `iter_<N>` is always a whole one.
"""

from __future__ import annotations

import json
import os
import pickle  # only for its error type: checkpoints are read with weights_only=True
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..errors import UserError

NAME = re.compile(r"^iter_(\d+)$")
STATE_FILE = "trainer_state.json"


def rng_state(generator: torch.Generator) -> dict:
    """Every RNG the run draws from, as tensors and plain numbers."""
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
    return state


def set_rng_state(state: dict, generator: torch.Generator) -> None:
    python = state["python"]
    random.setstate((python["version"], tuple(python["mt"].tolist()), python["gauss"]))
    numpy = state["numpy"]
    np.random.set_state((numpy["kind"], numpy["keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"], numpy["cached"]))
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(path: Path) -> None:
    for file in path.iterdir():
        with open(file, "rb") as f:
            os.fsync(f.fileno())


def save_checkpoint(folder: Path, iteration: int, model_state: dict, optimizer, lr_scheduler, generator, trainer_state: dict) -> Path:
    """Write `folder/iter_<iteration>` atomically; returns its path."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"iter_{iteration:07d}"
    tmp = folder / f".iter_{iteration:07d}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in model_state.items()}, tmp / "model.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(lr_scheduler.state_dict(), tmp / "lr_scheduler.pt")
        torch.save(rng_state(generator), tmp / "rng.pt")
        (tmp / STATE_FILE).write_text(json.dumps({"iteration": iteration, **trainer_state}, indent=2))
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except OSError as error:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"cannot write checkpoint {final}: {error.strerror or error}") from None
    return final


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint in `folder` (temporary folders are never matched)."""
    if not folder.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := NAME.match(p.name)) and (p / STATE_FILE).is_file()]
    return max(found)[1] if found else None


def load_checkpoint(path: Path, model, optimizer, lr_scheduler, generator) -> dict:
    """Restore everything in place; returns the trainer state (iteration, data position, ...)."""
    try:
        state = json.loads((path / STATE_FILE).read_text())
        model.load_state_dict(load_file(path / "model.safetensors"))  # strict: another model is refused
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
        lr_scheduler.load_state_dict(torch.load(path / "lr_scheduler.pt", weights_only=True))
        set_rng_state(torch.load(path / "rng.pt", weights_only=True), generator)
    except (OSError, ValueError, KeyError, RuntimeError, pickle.UnpicklingError) as error:
        raise UserError(f"cannot resume from {path}: {str(error).strip().splitlines()[0]}") from None
    return state
