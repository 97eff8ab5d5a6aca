"""The manifest's hashes: large files block by block (hashed in parallel), small ones whole; older one-hash-per-file
manifests still verify; damage in any block is found and named."""

import hashlib
import json

import pytest

from pgv25.engine import integrity
from pgv25.engine.integrity import MANIFEST, check_folder, finish_folder


@pytest.fixture()
def folder(tmp_path, monkeypatch):
    monkeypatch.setattr(integrity, "BLOCK", 1000)  # small blocks, so a small file has several
    root = tmp_path / "ckpt"
    (root / "unet").mkdir(parents=True)
    (root / "unet" / "weights.bin").write_bytes(bytes(range(256)) * 14)  # 3584 bytes: 4 blocks
    (root / "state.json").write_text('{"iteration": 3}')  # small: one hash
    finish_folder(root)
    return root


def test_large_files_are_hashed_by_block_and_small_ones_whole(folder):
    files = json.loads((folder / MANIFEST).read_text())["files"]
    data = (folder / "unet" / "weights.bin").read_bytes()
    assert files["unet/weights.bin"]["sha256_blocks"] == [hashlib.sha256(data[i : i + 1000]).hexdigest() for i in range(0, 3584, 1000)]
    assert files["state.json"]["sha256"] == hashlib.sha256(b'{"iteration": 3}').hexdigest()
    check = check_folder(folder)
    assert check.state == "intact" and check.files == 2 and check.bytes == 3584 + 16


@pytest.mark.parametrize("offset", [0, 1500, 3583])  # a byte in the first, a middle and the last (short) block
def test_a_changed_byte_in_any_block_is_found(folder, offset):
    path = folder / "unet" / "weights.bin"
    data = bytearray(path.read_bytes())
    data[offset] ^= 1
    path.write_bytes(bytes(data))
    assert check_folder(folder).state == "unet/weights.bin does not match the SHA-256 recorded when it was written"
    assert check_folder(folder, hashes=False).state == "intact"  # sizes alone cannot see it


def test_one_hash_per_file_manifests_still_verify(folder):
    whole = {name: {"size": (folder / name).stat().st_size, "sha256": integrity.sha256(folder / name)}
             for name in ("unet/weights.bin", "state.json")}
    (folder / MANIFEST).write_text(json.dumps({"version": 1, "files": whole}))
    assert check_folder(folder).state == "intact"
    (folder / "state.json").write_text('{"iteration": 4}')
    assert check_folder(folder).state == "state.json does not match the SHA-256 recorded when it was written"
