"""Writing files that are never seen half-written, with the permissions the user's umask gives.

Below every other module of pgv25 (it imports only `errors`): exports, single files, LoRA files and
checkpoints all write through it, so none of them has to import another to do so.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
from safetensors import SafetensorError

from .errors import UserError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # export.dtype and friends


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


UMASK = _umask()  # read once at import: os.umask can only be read by setting it


@contextlib.contextmanager
def atomic_file(out: Path):
    """Yield a temporary path beside `out` that replaces it once the block succeeds: `out` is never half-written.
    An OSError (no such folder, no permission, full disk) is one UserError line."""
    out = Path(out)
    if out.is_dir():
        raise UserError(f"{out} is a folder; give a file name")
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        os.chmod(tmp, 0o666 & ~UMASK)  # safetensors writes owner-only files
        os.replace(tmp, out)
    except (OSError, SafetensorError) as error:  # safetensors reports its own write failures (a full disk) in its type
        raise UserError(f"cannot write {out}: {getattr(error, 'strerror', None) or error}") from None
    finally:
        with contextlib.suppress(OSError):  # gone after the rename; never created when the folder could not be
            tmp.unlink(missing_ok=True)
