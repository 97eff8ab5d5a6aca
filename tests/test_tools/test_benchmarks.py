"""The benchmarks in tools/ run (on a reduced architecture, on CPU) and report what they claim to."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # launches processes or builds venvs: the full suite only (pytest -m 'not slow' skips it)

TOOLS = Path(__file__).resolve().parents[2] / "tools"
sys.path.insert(0, str(TOOLS))


def test_bench_train_measures_pgv25_and_the_reference_step(tiny_assets, tmp_path):
    import bench_train

    common = ["--arch", "tiny", "--device", "cpu", "--batch", "2", "--steps", "1", "--warmup", "0", "--rounds", "1"]
    rows = bench_train.main([*common, "--size", "64x64", "48x80", "--variants", "full", "adamw8bit"])
    rows += bench_train.main([*common, "--size", "48x80", "--variants", "lora64", "--markdown", str(tmp_path / "t.md")])
    measured = [r for r in rows if "error" not in r]
    eight_bit = {("adamw8bit", "64x64"), ("adamw8bit", "48x80")} if importlib.util.find_spec("bitsandbytes") else set()
    assert {(r["variant"], r["size"]) for r in measured} == {("full", "64x64"), ("full", "48x80"), ("lora64", "48x80")} | eight_bit
    for row in measured:
        assert row["images_per_s"] > 0 and row["reference_images_per_s"] > 0 and row["tflop_per_step"] > 0
    # FLOPs of a full step scale with the latent area: 48×80 has 15/16 of 64×64's pixels
    full = {r["size"]: r["tflop_per_step"] for r in measured if r["variant"] == "full"}
    assert 0.85 < full["48x80"] / full["64x64"] < 1.0
    skipped = [] if eight_bit else ["skip: 8-bit AdamW needs bitsandbytes (pip install bitsandbytes)"] * 2
    assert [r["error"] for r in rows if "error" in r] == skipped
    assert "| lora64 | 48x80 | 2 |" in (tmp_path / "t.md").read_text()


def test_bench_train_rounds_interleave_the_rows(tiny_assets, capsys):
    import bench_train

    rows = bench_train.main(["--arch", "tiny", "--device", "cpu", "--batch", "2", "--steps", "1", "--warmup", "0",
                             "--rounds", "2", "--size", "32x32", "--variants", "full", "full+cl"])
    printed = capsys.readouterr().out
    # every row once per round, the rounds one after the other
    assert [line.split(":")[0] for line in printed.splitlines() if line.startswith("round ")] == ["round 1"] * 2 + ["round 2"] * 2
    full, levers = rows
    assert (full["variant"], levers["variant"]) == ("full", "full+cl") and full["rounds"] == levers["rounds"] == 2
    assert full["spread"] >= 0 and full["images_per_s"] == pytest.approx(2 / full["step_s"]) and full["tflop_per_step"] > 0
    # the lever row is set against the plain row's reference, timed in the same rounds
    assert levers["reference_images_per_s"] == full["reference_images_per_s"]
    assert levers["speedup_vs_reference"] == pytest.approx(levers["images_per_s"] / full["reference_images_per_s"])


def test_a_reference_step_out_of_memory_keeps_pgv25s_row(tiny_assets, monkeypatch, tmp_path):
    """On an 80 GB card the reference's fp32 AdamW does not fit at batch 8 where 8-bit AdamW does: the row keeps
    pgv25's step and says why the reference is missing."""
    import bench_train

    def out_of_memory(self, batch):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(bench_train.ReferenceStep, "__call__", out_of_memory)
    rows = bench_train.main(["--arch", "tiny", "--device", "cpu", "--batch", "2", "--steps", "1", "--warmup", "0", "--rounds", "2",
                             "--size", "32x32", "--variants", "full", "--markdown", str(tmp_path / "t.md")])
    assert rows[0]["images_per_s"] > 0 and rows[0]["reference_error"] == "OOM" and "reference_images_per_s" not in rows[0]
    assert "| full | 32x32 | 2 |" in (tmp_path / "t.md").read_text() and "| OOM | – |" in (tmp_path / "t.md").read_text()


def test_playground_unet_config_has_the_published_parameter_count():
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    import bench_train

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(bench_train.PLAYGROUND_UNET)
    assert sum(p.numel() for p in unet.parameters()) == 2_567_463_684


def test_bench_generate_times_both_paths(tiny_assets):
    import bench_generate

    rows = bench_generate.main(["--model", str(tiny_assets["model"]), "--device", "cpu", "--size", "64", "--steps", "2", "--images", "1",
                                "--variants", "levers+compile", "diffusers", "--compile-backend", "eager"])
    assert [r["variant"] for r in rows] == ["diffusers", "levers+compile"]  # in the order the levers pile up
    assert all(r["seconds_per_image"] > 0 and r["first_image_s"] > 0 for r in rows)


def test_bench_overhead_compares_the_trainer_with_the_reference_loop(tiny_assets, tmp_path, monkeypatch):
    import bench_overhead

    from conftest import TINY_OPTIONS

    # paths under ~, like the tiny config's default cache location, reach both sides expanded
    monkeypatch.setenv("HOME", str(tiny_assets["root"]))
    paths = ["model.pretrained_model_name_or_path=~/playground-v2.5-tiny", "train_dataloader.dataset.path=~/shapes"]
    result = bench_overhead.main(["--iters", "1", "--rounds", "1", "--batch", "4", "--work-dir", str(tmp_path),
                                  "--cfg-options", *TINY_OPTIONS, *paths])
    assert result["pgv25_images_per_s"] > 0 and result["reference_images_per_s"] > 0
    assert result["overhead"] == pytest.approx(result["reference_images_per_s"] / result["pgv25_images_per_s"] - 1)
    assert result["same_work"]["train_dataloader.dataset.cache.enabled"] == "False"
    with pytest.raises(SystemExit):  # the reference has no latent cache: pgv25 may not use one either
        bench_overhead.main(["--cfg-options", "train_dataloader.dataset.cache.enabled=True"])


def test_bench_loader_runs(tmp_path):
    import bench_loader

    bench_loader.main(["--images", "8", "--batches", "1", "--workers", "0", "--json", str(tmp_path / "l.json")])
    import json

    results = json.loads((tmp_path / "l.json").read_text())["results"]
    assert {r["source"] for r in results} == {"jpeg", "png", "cache"} and all(r["images_per_s"] > 0 for r in results)


def test_bench_manifest_times_both_ways_and_cleans_up(tmp_path, capsys):
    import json

    import bench_manifest

    bench_manifest.main(["--gib", "0.01", "--dir", str(tmp_path / "b"), "--repeats", "1"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(result["whole_file_s"]) == len(result["blocks_s"]) == 1 and result["speedup"] > 0
    assert not (tmp_path / "b").exists()


def test_device_wheels_keep_one_cuda_library_and_a_matching_record(tmp_path):
    import zipfile

    import device_wheels

    wheel = tmp_path / "bitsandbytes-0.0-py3-none-manylinux_2_24_x86_64.whl"
    names = ["bitsandbytes/__init__.py", "bitsandbytes/libbitsandbytes_cpu.so", "bitsandbytes/libbitsandbytes_cuda118.so",
             "bitsandbytes/libbitsandbytes_cuda130.so", "bitsandbytes/libbitsandbytes_rocm72.so"]
    with zipfile.ZipFile(wheel, "w") as z:
        for name in names:
            z.writestr(name, name * 100)
        record = [f"{n},{device_wheels.record_hash((n * 100).encode())},{len(n) * 100}" for n in names]
        z.writestr("bitsandbytes-0.0.dist-info/RECORD", "\n".join(record + ["bitsandbytes-0.0.dist-info/RECORD,,"]) + "\n")
    before, after = device_wheels.slim(wheel, {"cpu", "cuda130"})
    assert after < before
    with zipfile.ZipFile(wheel) as z:
        kept = sorted(n for n in z.namelist() if n.endswith(".so"))
        listed = [line.split(",")[0] for line in z.read("bitsandbytes-0.0.dist-info/RECORD").decode().splitlines()]
        assert kept == ["bitsandbytes/libbitsandbytes_cpu.so", "bitsandbytes/libbitsandbytes_cuda130.so"]
        assert sorted(n for n in listed if n.endswith(".so")) == kept and "bitsandbytes/__init__.py" in listed
        assert z.read("bitsandbytes/__init__.py") == b"bitsandbytes/__init__.py" * 100
