"""Never lose a run, part 2: verified checkpoints and exports, one run per work dir, out-of-memory and disk guards."""

import logging
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY_OPTIONS, tiny_cfg
from pgv25.engine import runner, saving
from pgv25.engine.checkpoint import read_checkpoint
from pgv25.engine.integrity import MANIFEST, check_folder
from pgv25.engine.resume import checkpoint_to_resume
from pgv25.files import UMASK
from pgv25.engine.runner import train
from pgv25.errors import UserError

NO_GRID = "sample_grid.prompts=[]"
SIX = ["train_cfg.max_iters=6", "default_hooks.checkpoint.interval=2", "ema.enabled=True", NO_GRID]


@pytest.fixture(scope="module")
def six_iterations(tiny_assets, tmp_path_factory):
    """Checkpoints (with EMA) and exports at iterations 2, 4 and 6."""
    work = tmp_path_factory.mktemp("six")
    train(tiny_cfg(work, *SIX))
    return work


def damaged_copy(source: Path, dest: Path) -> Path:
    shutil.copytree(source / "checkpoints", dest / "checkpoints")
    return dest


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def unet(step_dir: Path) -> dict:
    return load_file(step_dir / "unet" / "diffusion_pytorch_model.safetensors")


def cli(*args) -> tuple[int, str, str]:
    """`pgv25 ARGS` in this process: exit code, stdout, stderr."""
    import contextlib
    import io

    from pgv25.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


def test_every_checkpoint_and_export_is_recorded_and_verifies(six_iterations):
    for folder in [*(six_iterations / "checkpoints").iterdir(), *six_iterations.glob("step*")]:
        check = check_folder(folder)
        assert check.state == "intact" and check.files > 1, folder
    code, out, _ = cli("ckpt", "verify", str(six_iterations))
    assert code == 0
    lines = out.splitlines()
    assert len(lines) == 6 and all("intact" in line for line in lines)


def test_written_files_get_the_umask_permissions(six_iterations):
    expected = 0o666 & ~UMASK  # safetensors alone would leave them -rw-------
    for path in [six_iterations / "checkpoints" / "iter_0000006" / "model.safetensors",
                 six_iterations / "step6" / "unet" / "diffusion_pytorch_model.safetensors",
                 six_iterations / "checkpoints" / "iter_0000006" / MANIFEST]:
        assert path.stat().st_mode & 0o777 == expected, path


@pytest.mark.parametrize("part", ["model.safetensors", "ema.safetensors", "optimizer.pt", "lr_scheduler.pt", "rng.pt",
                                  "trainer_state.json"])
def test_a_changed_byte_in_any_part_is_found_and_named(six_iterations, tmp_path, part):
    checkpoint = damaged_copy(six_iterations, tmp_path) / "checkpoints" / "iter_0000006"
    flip_a_byte(checkpoint / part)
    check = check_folder(checkpoint)
    assert check.damaged and part in check.state
    if part == "optimizer.pt":  # what --resume makes of it, once (each call loads the model)
        with pytest.raises(UserError, match=f"checkpoint .*iter_0000006 is damaged: {part.replace('.', '[.]')}"):
            train(tiny_cfg(tmp_path, *SIX), resume=str(checkpoint))


@pytest.mark.slow
def test_truncated_latest_checkpoint_falls_back_to_the_newest_intact_one_exactly(six_iterations, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="pgv25")
    work = damaged_copy(six_iterations, tmp_path)
    with open(work / "checkpoints" / "iter_0000006" / "model.safetensors", "r+b") as f:
        f.truncate(1000)  # what a full disk during a copy leaves
    # The first attempt is killed while it falls back: nothing is lost, the next one does the same.
    process = subprocess.Popen([sys.executable, "-m", "pgv25.cli", "train", "playgroundv2_5_tiny_shapes", "--work-dir", str(work),
                                "--resume", "--cfg-options", *TINY_OPTIONS, *SIX, "train_dataloader.batch_size=4",
                                "default_hooks.logger.interval=1", "validation.interval=0",
                                "train_dataloader.dataset.cache.enabled=False"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = ""
    while "is damaged" not in seen:
        line = process.stdout.readline()
        assert line, seen
        seen += line
    process.send_signal(signal.SIGKILL)
    process.wait()
    result = train(tiny_cfg(work, *SIX), resume=True)
    warnings = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
    assert len(warnings) == 1 and "iter_0000006" in warnings[0] and "model.safetensors has 1,000 bytes" in warnings[0]
    assert "resumed from" in caplog.text and "iter_0000004" in caplog.text
    straight, resumed = unet(six_iterations / "step6"), unet(result.step_dir)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert check_folder(work / "checkpoints" / "iter_0000006").state == "intact"  # written again


def test_every_checkpoint_damaged_is_one_line(six_iterations, tmp_path):
    work = damaged_copy(six_iterations, tmp_path)
    for checkpoint in (work / "checkpoints").iterdir():
        (checkpoint / "optimizer.pt").write_bytes(b"")
    with pytest.raises(UserError, match="every checkpoint in .* is damaged .*optimizer.pt has 0 bytes"):
        train(tiny_cfg(work, *SIX), resume=True)


def test_an_unreadable_checkpoint_without_a_manifest_is_one_line(six_iterations, tmp_path):
    checkpoint = damaged_copy(six_iterations, tmp_path) / "checkpoints" / "iter_0000006"
    (checkpoint / MANIFEST).unlink()  # as written by an older pgv25
    assert check_folder(checkpoint).state == "unverified"
    with open(checkpoint / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(UserError, match=r"model.safetensors is unreadable \(") as error:
        read_checkpoint(checkpoint)
    assert "\n" not in str(error.value)


def test_a_damaged_export_is_reported_before_it_ships(six_iterations, tmp_path):
    export = tmp_path / "step6"
    shutil.copytree(six_iterations / "step6", export)
    flip_a_byte(export / "unet" / "diffusion_pytorch_model.safetensors")
    code, out, _ = cli("ckpt", "verify", str(export))
    assert code == 1
    assert "DAMAGED: unet/diffusion_pytorch_model.safetensors does not match" in out
    code, _, err = cli("ckpt", "verify", str(tmp_path / "nothing"))
    assert code == 2 and err.strip().count("\n") == 0 and "is not a folder" in err


HOLD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from pgv25.engine.locks import {what}
    {use}
    Path(sys.argv[2]).write_text("held")
    time.sleep(float(sys.argv[3]))
    Path(sys.argv[2]).write_text("done")  # the lock goes with the process, right after
""")


def hold(what: str, use: str, folder: Path, marker: Path, seconds: float) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", HOLD.format(what=what, use=use), str(folder), str(marker), str(seconds)])
    while not marker.exists():
        assert process.poll() is None
        time.sleep(0.05)
    return process


def test_a_second_run_on_a_work_dir_refuses_and_kill_9_leaves_no_stale_lock(tiny_assets, tmp_path):
    holder = hold("WorkDirLock", "lock = WorkDirLock(Path(sys.argv[1]))", tmp_path, tmp_path / "held", 120)
    try:
        with pytest.raises(UserError, match=f"work dir {tmp_path} is in use by another pgv25 run \\(PID {holder.pid} on "):
            train(tiny_cfg(tmp_path, "train_cfg.max_iters=1", NO_GRID))
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert train(tiny_cfg(tmp_path, "train_cfg.max_iters=1", NO_GRID)).iteration == 1


def test_a_cache_being_built_is_waited_for(tmp_path, caplog):
    from pgv25.engine.locks import building

    caplog.set_level(logging.INFO, logger="pgv25")
    folder = tmp_path / "cache"
    holder = hold("building", "context = building(Path(sys.argv[1]), 'x'); context.__enter__()", folder, tmp_path / "held", 1.5)
    with building(folder, "the test cache"):
        assert (tmp_path / "held").read_text() == "done"  # the other build had finished before this one began
    holder.wait()
    assert f"waiting for PID {holder.pid}" in caplog.text


def test_out_of_memory_is_one_line_with_what_helps_and_the_checkpoint_untouched(tiny_assets, tmp_path, monkeypatch):
    step = runner.Trainer.step

    def running_out(self, *args, **kwargs):
        if self.iteration == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return step(self, *args, **kwargs)

    monkeypatch.setattr(runner.Trainer, "step", running_out)
    cfg = tiny_cfg(tmp_path, "train_cfg.max_iters=6", "default_hooks.checkpoint.interval=2", NO_GRID)
    with pytest.raises(UserError) as error:
        train(cfg)
    message = str(error.value)
    assert "\n" not in message and message.startswith("iteration 4: out of GPU memory on a batch of 4 images at ")
    for switch in ("gradient_checkpointing=True", "accumulative_counts", "AdamW8bit", "model.lora.enabled=True"):
        assert switch in message
    assert "iter_0000002, is untouched" in message
    assert check_folder(tmp_path / "checkpoints" / "iter_0000002").state == "intact"


def test_no_room_skips_a_save_then_stops_at_the_second(tiny_assets, tmp_path, monkeypatch, caplog):
    free = {"bytes": 10**12}
    monkeypatch.setattr(saving, "free_bytes", lambda folder: free["bytes"])
    cfg = tiny_cfg(tmp_path, "train_cfg.max_iters=8", "default_hooks.checkpoint.interval=2", NO_GRID)
    trainer = runner.Trainer(cfg)
    for _ in range(2):
        trainer.step()
        trainer.iteration += 1
    trainer.save()  # iteration 2: written
    free["bytes"] = 1000
    for _ in range(2):
        trainer.step()
        trainer.iteration += 1
    assert trainer.save() == (None, None)  # iteration 4: skipped, training goes on
    assert "iteration 4: no room for the checkpoint and export: about" in caplog.text and "GiB free" in caplog.text
    with pytest.raises(UserError, match="stopped after two saves in a row could not be written"):
        trainer.save()
    assert [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith("iter")] == ["iter_0000002"]
    assert check_folder(tmp_path / "checkpoints" / "iter_0000002").state == "intact"
    free["bytes"] = 10**12
    trainer.skipped_saves = 0
    assert trainer.save()[0].name == "iter_0000004"  # room again: saves resume
    trainer.release()


def test_a_checkpoint_whose_manifest_was_lost_is_passed_over_in_one_line(six_iterations, tmp_path, caplog):
    """Checkpoints 2 and 4 have manifests: 6 was written by the same pgv25, so its missing manifest was lost later and
    nothing vouches for its files. --resume takes 4 and says why in one line; named explicitly, 6 is used, with the line."""
    caplog.set_level(logging.INFO, logger="pgv25")
    work = damaged_copy(six_iterations, tmp_path)
    (work / "checkpoints" / "iter_0000006" / MANIFEST).unlink()
    assert checkpoint_to_resume(True, work) == work / "checkpoints" / "iter_0000004"
    lines = [r.getMessage() for r in caplog.records if "iter_0000006" in r.getMessage()]
    assert len(lines) == 1 and "manifest" in lines[0] and "cannot be checked" in lines[0] and "iter_0000004" in lines[0]
    assert "\n" not in lines[0]
    caplog.clear()
    named = work / "checkpoints" / "iter_0000006"
    assert checkpoint_to_resume(str(named), work) == named
    assert [r.levelname for r in caplog.records if "cannot be checked" in r.getMessage()] == ["WARNING"]


def test_legacy_checkpoints_without_manifests_resume_from_the_newest_with_a_line(six_iterations, tmp_path, caplog):
    """No checkpoint has a manifest (written before manifests existed): the newest is used, and the line says so."""
    caplog.set_level(logging.INFO, logger="pgv25")
    work = damaged_copy(six_iterations, tmp_path)
    for checkpoint in (work / "checkpoints").iterdir():
        (checkpoint / MANIFEST).unlink()
    assert checkpoint_to_resume(True, work) == work / "checkpoints" / "iter_0000006"
    lines = [r.getMessage() for r in caplog.records if "manifest" in r.getMessage()]
    assert len(lines) == 1 and "iter_0000006" in lines[0] and "written without a manifest" in lines[0]


def test_only_lost_manifests_and_damage_is_one_line(six_iterations, tmp_path):
    """The newest without its manifest and the older ones damaged: nothing verified is left, so the error names both."""
    work = damaged_copy(six_iterations, tmp_path)
    (work / "checkpoints" / "iter_0000006" / MANIFEST).unlink()
    for name in ("iter_0000002", "iter_0000004"):
        (work / "checkpoints" / name / "optimizer.pt").write_bytes(b"")
    with pytest.raises(UserError) as error:
        checkpoint_to_resume(True, work)
    message = str(error.value)
    assert "\n" not in message and "iter_0000006" in message and "iter_0000002" in message and "--resume" in message
