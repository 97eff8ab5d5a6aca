"""What a checkpoint or export holds, recorded so that damage is found before anyone relies on it.

`pgv25_manifest.json` lists every file of the folder with its size and SHA-256. It is written last,
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
from dataclasses import dataclass
from pathlib import Path

MANIFEST = "pgv25_manifest.json"
INTACT, UNVERIFIED = "intact", "unverified"
_CHUNK = 1 << 22


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


UMASK = _umask()  # read once at import: os.umask can only be read by setting it


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


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
    files = {str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": sha256(p)} for p in _files(folder)}
    manifest = folder / MANIFEST
    manifest.write_text(json.dumps({"version": 1, "files": files}, indent=1))
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
        recorded = {name: (int(entry["size"]), str(entry["sha256"])) for name, entry in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return Check(f"{MANIFEST} is unreadable")
    total = 0
    for name, (size, digest) in recorded.items():
        path = folder / name
        try:
            actual = path.stat().st_size
        except OSError:
            return Check(f"{name} is missing")
        if actual != size:
            return Check(f"{name} has {actual:,} bytes, {size:,} were written")
        total += size
    if hashes:
        for name, (_, digest) in recorded.items():
            try:
                if sha256(folder / name) != digest:
                    return Check(f"{name} does not match the SHA-256 recorded when it was written")
            except OSError as error:
                return Check(f"{name} cannot be read ({error.strerror or error})")
    return Check(INTACT, len(recorded), total)


def folders_to_check(target: Path) -> list[tuple[str, Path]]:
    """(kind, folder) of every checkpoint and export under a work dir, or the one checkpoint or export given."""
    from .checkpoint import NAME, STATE_FILE

    if (target / STATE_FILE).is_file():
        return [("checkpoint", target)]
    if (target / "model_index.json").is_file() or (target / "pytorch_lora_weights.safetensors").is_file():
        return [("export", target)]
    found = []
    checkpoints = target / "checkpoints"
    if checkpoints.is_dir():
        numbered = sorted((int(m.group(1)), p) for p in checkpoints.iterdir() if (m := NAME.match(p.name)))
        found += [("checkpoint", p) for _, p in numbered]
    exports = [p for p in target.glob("step*") if p.is_dir() and p.name[4:].split("_")[0].isdigit()]
    found += [("export", p) for p in sorted(exports, key=lambda p: (int(p.name[4:].split("_")[0]), p.name))]
    return found


def report(target: Path) -> tuple[list[str], bool]:
    """Lines for `pgv25 ckpt verify`, and whether everything checked is intact or unverified."""
    from ..errors import UserError
    from .checkpoint import STATE_FILE

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
