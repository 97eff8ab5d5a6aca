"""What a checkpoint or export holds, recorded so that damage is found before anyone relies on it.

`pgv25_manifest.json` lists every file of the folder with its size and SHA-256 (a large file's as the SHA-256 of
each BLOCK-sized piece, so that one file hashes on several cores: a 29 GiB full-size checkpoint is mostly two
files, and hashing them whole took ~40 s of a 107 s save on an H200 machine). It is written last,
inside the temporary folder that is then renamed into place, so it always describes a complete
folder: a truncated file (a full disk, an interrupted copy between machines) shows as a wrong size, a
changed byte as a wrong hash, a lost file as missing. Folders written before manifests existed are
reported as unverified, not as damaged.

Files are also given the permissions the user's umask gives any new file: some writers (safetensors,
temporary files) create them owner-only, which hides an export from a teammate or a server running
as another user.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..files import UMASK

MANIFEST = "pgv25_manifest.json"
# The names that say what a folder is (checkpoint.py writes them; `ckpt verify` finds folders by them)
CHECKPOINT_DIR = re.compile(r"^iter_(\d+)$")  # checkpoints/iter_<N>
STATE_FILE = "trainer_state.json"  # in every checkpoint
VERSION = 2  # 1: one SHA-256 per file (still verified)
INTACT, UNVERIFIED = "intact", "unverified"
_CHUNK = 1 << 22
BLOCK = 1 << 28  # 256 MiB: files larger than this are hashed block by block, the blocks in parallel


def sha256(path: Path, offset: int = 0, length: int | None = None) -> str:
    """Of the whole file, or of `length` bytes from `offset` (hashlib releases the GIL: threads hash in parallel)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        left = length
        while left is None or left > 0:
            block = f.read(_CHUNK if left is None else min(_CHUNK, left))
            if not block:
                break
            digest.update(block)
            if left is not None:
                left -= len(block)
    return digest.hexdigest()


def _workers() -> int:
    return max(1, min(16, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def digests(folder: Path, sizes: dict[str, int], block: int | None = None) -> dict[str, dict]:
    """name → {"sha256": ...} for files up to `block` (default BLOCK) bytes, {"block": block, "sha256_blocks": [...]}
    for larger ones, every piece hashed on a thread of its own."""
    block = block or BLOCK
    jobs = [(name, offset, block if size > block else None) for name, size in sizes.items()
            for offset in (range(0, size, block) if size > block else [0])]
    with ThreadPoolExecutor(_workers()) as pool:
        hashes = list(pool.map(lambda job: sha256(folder / job[0], job[1], job[2]), jobs))
    out: dict[str, dict] = {}
    for (name, _, length), digest in zip(jobs, hashes):
        if length is None:
            out[name] = {"sha256": digest}
        else:
            out.setdefault(name, {"block": block, "sha256_blocks": []})["sha256_blocks"].append(digest)
    return out


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def share_permissions(folder: Path) -> None:
    """The permissions the umask gives any new file or folder, on `folder` and everything in it."""
    for path in [folder, *folder.rglob("*")]:
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~UMASK)


def finish_folder(folder: Path) -> None:
    """Before the rename that publishes `folder`: ordinary permissions on everything in it, then the manifest."""
    share_permissions(folder)
    sizes = {str(p.relative_to(folder)): p.stat().st_size for p in _files(folder)}
    hashes = digests(folder, sizes)
    files = {name: {"size": size, **hashes[name]} for name, size in sizes.items()}
    manifest = folder / MANIFEST
    manifest.write_text(json.dumps({"version": VERSION, "files": files}, indent=1))
    os.chmod(manifest, 0o666 & ~UMASK)


@dataclass
class Check:
    state: str  # INTACT, UNVERIFIED, or what is wrong (naming the file)
    files: int = 0
    bytes: int = 0

    @property
    def damaged(self) -> bool:
        return self.state not in (INTACT, UNVERIFIED)


def check_folder(folder: Path, hashes: bool = True) -> Check:
    """Compare a checkpoint or export with its manifest: sizes always, SHA-256 too unless `hashes=False`."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return Check(UNVERIFIED)
    try:
        files = json.loads(manifest.read_text())["files"]
        recorded = {name: (int(entry["size"]), _recorded_hash(entry)) for name, entry in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return Check(f"{MANIFEST} is unreadable")
    total = 0
    for name, (size, _) in recorded.items():
        path = folder / name
        try:
            actual = path.stat().st_size
        except OSError:
            return Check(f"{name} is missing")
        if actual != size:
            return Check(f"{name} has {actual:,} bytes, {size:,} were written")
        total += size
    if hashes:
        for block in {entry[1][0] for entry in recorded.values()}:  # one pass per block size the manifest used
            group = {name: size for name, (size, (b, _)) in recorded.items() if b == block}
            try:
                found = digests(folder, group, block or max(group.values(), default=0) + 1)
            except OSError as error:
                name = os.path.relpath(error.filename, folder) if error.filename else "a file"
                return Check(f"{name} cannot be read ({error.strerror or error})")
            for name in sorted(group):
                if _recorded_hash(found[name]) != recorded[name][1]:
                    return Check(f"{name} does not match the SHA-256 recorded when it was written")
    return Check(INTACT, len(recorded), total)


def _recorded_hash(entry: dict) -> tuple[int, tuple[str, ...]]:
    """(block size, 0 for whole-file, and the digests) of a manifest entry, version 1 or 2."""
    if "sha256_blocks" in entry:
        return int(entry["block"]), tuple(str(d) for d in entry["sha256_blocks"])
    return 0, (str(entry["sha256"]),)


def folders_to_check(target: Path) -> list[tuple[str, Path]]:
    """(kind, folder) of every checkpoint and export under a work dir, or the one checkpoint or export given."""
    if (target / STATE_FILE).is_file():
        return [("checkpoint", target)]
    if (target / "model_index.json").is_file() or (target / "pytorch_lora_weights.safetensors").is_file():
        return [("export", target)]
    found = []
    checkpoints = target / "checkpoints"
    if checkpoints.is_dir():
        numbered = sorted((int(m.group(1)), p) for p in checkpoints.iterdir() if (m := CHECKPOINT_DIR.match(p.name)))
        found += [("checkpoint", p) for _, p in numbered]
    exports = [p for p in target.glob("step*") if p.is_dir() and p.name[4:].split("_")[0].isdigit()]
    found += [("export", p) for p in sorted(exports, key=lambda p: (int(p.name[4:].split("_")[0]), p.name))]
    return found


def report(target: Path) -> tuple[list[str], bool]:
    """Lines for `pgv25 ckpt verify`, and whether everything checked is intact or unverified."""
    if not target.is_dir():
        raise UserError(f"ckpt verify: {target} is not a folder (give a work dir, a checkpoint or an export)")
    folders = folders_to_check(target)
    if not folders:
        raise UserError(f"ckpt verify: {target} holds no checkpoints/iter_<N> and no step<N> exports")
    lines, healthy = [], True
    for kind, folder in folders:
        check = check_folder(folder) if kind == "export" or (folder / STATE_FILE).is_file() else Check(f"{STATE_FILE} is missing")
        healthy &= not check.damaged
        detail = {INTACT: f"intact ({check.files} files, {check.bytes / 2**20:,.1f} MiB)",
                  UNVERIFIED: "unverified (written without a manifest)"}.get(check.state, f"DAMAGED: {check.state}")
        lines.append(f"{kind:10s} {folder}  {detail}")
    return lines, healthy
