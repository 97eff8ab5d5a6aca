"""Never lose work: rotation, non-finite guard, failed and interrupted saves, config changes, signals."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY_OPTIONS, tiny_cfg, wait_for_logged_iterations
from pgv25.engine import checkpoint as checkpoint_module
from pgv25.engine.checkpoint import complete_checkpoints, latest_checkpoint
from pgv25.engine.runner import Trainer, train
from pgv25.engine.signals import GracefulStop
from pgv25.errors import UserError

NO_GRID = "sample_grid.prompts=[]"


def weights(checkpoint: Path) -> dict:
    return load_file(checkpoint / "model.safetensors")


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def two_iterations(tiny_assets, tmp_path_factory):
    """A run with a complete checkpoint at iteration 2 (interval 2)."""
    work = tmp_path_factory.mktemp("two")
    train(tiny_cfg(work, "train_cfg.max_iters=2", "default_hooks.checkpoint.interval=2", NO_GRID))
    return work


def copy_run(source: Path, dest: Path) -> Path:
    shutil.copytree(source / "checkpoints", dest / "checkpoints")
    return dest


@pytest.mark.slow
def test_rotation_keeps_the_newest_checkpoints_and_every_export(tiny_assets, tmp_path):
    train(tiny_cfg(tmp_path, "train_cfg.max_iters=5", "default_hooks.checkpoint.interval=1",
                   "default_hooks.checkpoint.max_keep_ckpts=2", NO_GRID))
    assert [p.name for p in complete_checkpoints(tmp_path / "checkpoints")] == ["iter_0000004", "iter_0000005"]
    assert sorted(p.name for p in tmp_path.glob("step*")) == [f"step{i}" for i in range(1, 6)]


def test_nonfinite_updates_are_skipped_counted_and_stop_the_run(tiny_assets, tmp_path):
    cfg = tiny_cfg(tmp_path, "train_cfg.max_iters=8", "default_hooks.checkpoint.interval=2",
                   "train_cfg.max_nonfinite_iters=3", NO_GRID)
    trainer = Trainer(cfg)
    poisoned = {3, 5, 6, 7}  # iterations whose latents turn NaN (3 in a row from 5)
    encode = trainer.codec.encode

    def encode_with_nan(pixels, generator):
        x0 = encode(pixels, generator)
        return x0 * float("nan") if trainer.iteration + 1 in poisoned else x0

    trainer.codec.encode = encode_with_nan
    with pytest.raises(UserError, match=r"iteration 7: 3 consecutive iterations with a non-finite"):
        trainer.run()
    checkpoints = {p.name: p for p in complete_checkpoints(tmp_path / "checkpoints")}
    assert sorted(checkpoints) == ["iter_0000002", "iter_0000004", "iter_0000006"]
    for path in checkpoints.values():
        assert all(torch.isfinite(v).all() for v in weights(path).values())
    # Iterations 5 and 6 were skipped: the weights after 6 are those after 4; iteration 4 did update.
    assert same(weights(checkpoints["iter_0000006"]), weights(checkpoints["iter_0000004"]))
    assert not same(weights(checkpoints["iter_0000004"]), weights(checkpoints["iter_0000002"]))
    assert json.loads((checkpoints["iter_0000006"] / "trainer_state.json").read_text())["nonfinite_skipped"] == 3


@pytest.mark.slow
def test_disk_full_during_a_save_is_one_clear_error_and_the_previous_checkpoint_survives(two_iterations, tmp_path, monkeypatch):
    work = copy_run(two_iterations, tmp_path)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_module, "save_file", disk_full)
    cfg = tiny_cfg(work, "train_cfg.max_iters=4", "default_hooks.checkpoint.interval=2", NO_GRID)
    with pytest.raises(UserError, match=r"cannot write checkpoint .*iter_0000004: No space left on device; the previous checkpoint is intact"):
        train(cfg, resume=True)
    assert latest_checkpoint(work / "checkpoints").name == "iter_0000002"
    assert not list((work / "checkpoints").glob(".*")), "temporary folder left behind"
    monkeypatch.undo()
    assert train(cfg, resume=True).iteration == 4  # and the run goes on from it


def test_a_save_killed_midway_is_never_picked_and_is_cleaned_up(two_iterations, tmp_path):
    work = copy_run(two_iterations, tmp_path)
    checkpoints = work / "checkpoints"
    # What `kill -9` during a save can leave: a temporary folder with some of the files ...
    stale = checkpoints / ".iter_0000003.tmp4242"
    shutil.copytree(checkpoints / "iter_0000002", stale)
    (stale / "trainer_state.json").unlink()
    (stale / "model.safetensors").write_bytes(b"trunc")
    # ... and a folder someone copied by hand without its state file.
    (checkpoints / "iter_0000009").mkdir()
    assert latest_checkpoint(checkpoints).name == "iter_0000002"
    result = train(tiny_cfg(work, "train_cfg.max_iters=3", "default_hooks.checkpoint.interval=1", NO_GRID), resume=True)
    assert result.iteration == 3 and result.checkpoint.name == "iter_0000003"
    assert not stale.exists()


@pytest.mark.slow
def test_a_changed_config_is_refused_on_resume_unless_allowed(two_iterations, tmp_path):
    work = copy_run(two_iterations, tmp_path)
    changed = tiny_cfg(work, "train_cfg.max_iters=3", "train_dataloader.batch_size=2", NO_GRID)
    with pytest.raises(UserError, match=r"train_dataloader\.batch_size: 4 -> 2.*--allow-config-change"):
        train(changed, resume=True)
    other_model = tiny_cfg(work, "train_cfg.max_iters=3", "model.loss_weighting=none", NO_GRID)
    with pytest.raises(UserError, match=r"model\.loss_weighting: 'edm' -> 'none'"):
        train(other_model, resume=True)
    assert train(changed, resume=True, allow_config_change=True).iteration == 3
    # The iteration count, logging and checkpoint interval may change freely.
    longer = tiny_cfg(work, "train_cfg.max_iters=4", "default_hooks.logger.interval=2", NO_GRID, "train_dataloader.batch_size=2")
    assert train(longer, resume=True).iteration == 4


def test_graceful_stop_first_signal_requests_a_second_ctrl_c_aborts():
    before = signal.getsignal(signal.SIGTERM)
    with GracefulStop() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert stop.received == "SIGTERM"
        os.kill(os.getpid(), signal.SIGTERM)  # the scheduler's and torchrun's copy of one preemption
        time.sleep(0.05)
        assert stop.received == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.slow
def test_sigterm_finishes_the_step_checkpoints_and_exits_0(tiny_assets, tmp_path):
    work = tmp_path / "run"
    options = TINY_OPTIONS + ["train_dataloader.batch_size=4", "default_hooks.logger.interval=1", NO_GRID, "validation.interval=0",
                              "train_dataloader.dataset.cache.enabled=False"]  # as tiny_cfg, which resumes it
    process = subprocess.Popen(
        [sys.executable, "-m", "pgv25.cli", "train", "playgroundv2_5_tiny_shapes", "--work-dir", str(work), "--cfg-options",
         *options, "train_cfg.max_iters=100000", "default_hooks.checkpoint.interval=100000"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    wait_for_logged_iterations(process, work, 2)
    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 0, out[-3000:]
    stopped_at = json.loads((work / "scalars.jsonl").read_text().splitlines()[-1])["iteration"]
    assert f"stopped by SIGTERM after iteration {stopped_at}" in out
    assert "resume with: pgv25 train playgroundv2_5_tiny_shapes --work-dir" in out and out.rstrip().endswith("--resume")
    assert latest_checkpoint(work / "checkpoints").name == f"iter_{stopped_at:07d}"
    result = train(tiny_cfg(work, f"train_cfg.max_iters={stopped_at + 1}", NO_GRID), resume=True)
    assert result.iteration == stopped_at + 1
