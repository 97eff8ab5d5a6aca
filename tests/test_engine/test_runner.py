"""Training end to end on the tiny assets: exports, exact resume, plain-diffusers loading."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_cfg
from pgv25.engine.progress import TRAIN_LOG_ONLY
from pgv25.engine.runner import train

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, tiny_assets):
    work = tmp_path_factory.mktemp("straight")
    cfg = tiny_cfg(work, "train_cfg.max_iters=6", "default_hooks.checkpoint.interval=3", "param_scheduler.warmup_iters=2")
    result = train(cfg)
    return work, result.step_dir, result.grid


def unet_weights(step_dir):
    return load_file(Path(step_dir) / "unet" / "diffusion_pytorch_model.safetensors")


def test_writes_exports_checkpoints_grid_log_and_resolved_config(straight_run):
    work, step_dir, grid = straight_run
    assert step_dir == work / "step6"
    for step in ("step3", "step6"):
        assert (work / step / "model_index.json").is_file() and (work / step / "unet" / "config.json").is_file()
        for part in ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2", "vae", "scheduler"):
            assert (work / step / part).is_dir()
    assert sorted(p.name for p in (work / "checkpoints").iterdir()) == ["iter_0000003", "iter_0000006"]
    assert grid is not None and grid.is_file()
    assert (work / "playgroundv2_5_tiny_shapes.py").is_file()
    assert list(work.rglob("events.out.tfevents*")), "no TensorBoard log"
    assert not list(work.glob(".*tmp*")), "temporary folders left behind"


def test_training_changed_the_unet_and_exports_differ(straight_run, tiny_assets):
    work, _, _ = straight_run
    base = load_file(tiny_assets["model"] / "unet" / "diffusion_pytorch_model.safetensors")
    step3, step6 = unet_weights(work / "step3"), unet_weights(work / "step6")
    assert set(base) == set(step6)
    assert any(not torch.equal(base[k], step6[k]) for k in base)
    assert any(not torch.equal(step3[k], step6[k]) for k in step3)


def test_frozen_parts_are_the_base_pipelines_bytes(straight_run, tiny_assets):
    work, _, _ = straight_run
    for relative in ("vae/diffusion_pytorch_model.safetensors", "text_encoder_2/model.safetensors", "model_index.json"):
        assert (work / "step6" / relative).read_bytes() == (tiny_assets["model"] / relative).read_bytes()


def test_resume_is_exact(straight_run, tmp_path):
    work, _, _ = straight_run
    cfg = tiny_cfg(tmp_path, "train_cfg.max_iters=6", "default_hooks.checkpoint.interval=3",
                   "param_scheduler.warmup_iters=2", "sample_grid.prompts=[]")
    step_dir = train(cfg, resume=str(work / "checkpoints" / "iter_0000003")).step_dir
    resumed, straight = unet_weights(step_dir), unet_weights(work / "step6")
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)
    # Iterations 4-6 logged the same losses and gradient norms, to the last bit.
    assert scalars(tmp_path) == scalars(work)[3:]


def scalars(work) -> list[dict]:
    lines = (Path(work) / "scalars.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in ("images_per_s", "loader_wait")} for line in lines]


def test_a_start_from_scratch_drops_what_an_earlier_attempt_logged(tiny_assets, tmp_path):
    """An attempt killed before its first checkpoint left scalars and TensorBoard events; the next start from iteration 0
    (here `--resume` with no checkpoint yet) logs one curve, not the old one and the new one."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    old = 99.0  # a loss no real step of the tiny model gives
    (tmp_path / "scalars.jsonl").write_text("".join(json.dumps({"iteration": i, "loss": old}) + "\n" for i in (0, 1, 2, 3)))
    writer = SummaryWriter(tmp_path / "tensorboard" / "pgv25")
    for i in (1, 2, 3):
        writer.add_scalar("loss", old, i)
    writer.close()
    train(tiny_cfg(tmp_path, "train_cfg.max_iters=2", "sample_grid.prompts=[]"), resume=True)
    rows = scalars(tmp_path)
    assert [r["iteration"] for r in rows] == [1, 2] and old not in [r["loss"] for r in rows]
    events = EventAccumulator(str(tmp_path / "tensorboard" / "pgv25"))
    events.Reload()
    assert [(e.step, e.value == old) for e in events.Scalars("loss")] == [(1, False), (2, False)]
    # A resume purges only what came after its checkpoint: iterations 1-2 stay, 3-4 are logged once.
    train(tiny_cfg(tmp_path, "train_cfg.max_iters=4", "sample_grid.prompts=[]"), resume=True)
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4] and [r["iteration"] for r in scalars(tmp_path)] == [1, 2, 3, 4]


def test_resume_latest_at_the_end_only_re_exports(straight_run, tmp_path):
    import shutil

    work, _, _ = straight_run
    shutil.copytree(work / "checkpoints", tmp_path / "checkpoints")
    cfg = tiny_cfg(tmp_path, "train_cfg.max_iters=6", "sample_grid.prompts=[]")
    step_dir = train(cfg, resume=True).step_dir
    assert step_dir == tmp_path / "step6"
    assert all(torch.equal(a, b) for a, b in zip(unet_weights(step_dir).values(), unet_weights(work / "step6").values()))


def test_checkpoints_refuse_pickled_objects(straight_run, tmp_path):
    import shutil

    from pgv25.errors import UserError

    work, _, _ = straight_run
    ckpt = tmp_path / "checkpoints" / "iter_0000003"
    shutil.copytree(work / "checkpoints" / "iter_0000003", ckpt)
    torch.save({"state": {}, "param_groups": [], "evil": print}, ckpt / "optimizer.pt")  # a function is not a tensor
    with pytest.raises(UserError, match="is damaged: optimizer.pt"):  # its manifest no longer matches
        train(tiny_cfg(tmp_path, "train_cfg.max_iters=4", "sample_grid.prompts=[]"), resume=str(ckpt))
    (ckpt / "pgv25_manifest.json").unlink()  # as an older pgv25 wrote it: the loader itself refuses
    with pytest.raises(UserError, match="cannot resume from .*: optimizer.pt is unreadable"):
        train(tiny_cfg(tmp_path, "train_cfg.max_iters=4", "sample_grid.prompts=[]"), resume=str(ckpt))


@pytest.mark.slow
def test_plain_diffusers_loads_the_export(straight_run, tiny_assets, tmp_path):
    work, step_dir, _ = straight_run
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "check_export.py"), str(step_dir), "--base", str(tiny_assets["model"]),
         "--steps", "4", "--out", str(tmp_path / "x.png")],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["pipeline"] == "StableDiffusionXLPipeline"
    assert report["scheduler"] == "EDMDPMSolverMultistepScheduler"
    assert report["pgv25_imported"] is False and report["ok"]
    assert (tmp_path / "x.png").is_file()


def test_generate_command(straight_run, tmp_path):
    from pgv25.cli import main
    from PIL import Image

    _, step_dir, _ = straight_run
    out = tmp_path / "one.png"
    assert main(["generate", "--model", str(step_dir), "--prompt", "a red circle on a white background",
                 "--steps", "3", "--out", str(out)]) == 0
    assert Image.open(out).size == (64, 64)
    grid = tmp_path / "grid.png"
    assert main(["generate", "--model", str(step_dir), "--prompt", "a", "b", "--num-images", "2",
                 "--scheduler", "euler", "--steps", "3", "--out", str(grid)]) == 0
    assert grid.is_file() and len(list(tmp_path.glob("grid_*.png"))) == 4


def test_scalars_split_the_loss_by_sigma_range(straight_run):
    work, _, _ = straight_run
    for line in (work / "scalars.jsonl").read_text().splitlines():
        row = json.loads(line)
        bins = [v for k, v in row.items() if k.startswith("loss_sigma/")]
        assert bins, row
        # One micro-batch per logged iteration: the loss is a weighted mean of the bin means.
        slack = 1e-5 * max(abs(b) for b in bins)  # the same float32 losses summed in another order
        assert min(bins) - slack <= row["loss"] <= max(bins) + slack


def test_training_from_the_latent_cache_resumes_exactly_without_loading_encoders(tiny_assets, tmp_path):
    from pgv25.engine.runner import Trainer

    options = ["train_dataloader.dataset.cache.enabled=True", "train_cfg.max_iters=4", "default_hooks.checkpoint.interval=2",
               "sample_grid.prompts=[]"]
    trainer = Trainer(tiny_cfg(tmp_path / "a", *options))
    assert trainer.codec is None and trainer.conditioner is None  # no VAE, no text encoders
    straight = trainer.run()
    resumed = train(tiny_cfg(tmp_path / "b", *options), resume=str(tmp_path / "a" / "checkpoints" / "iter_0000002"))
    a, b = unet_weights(straight.step_dir), unet_weights(resumed.step_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert scalars(tmp_path / "b") == scalars(tmp_path / "a")[2:]


@pytest.mark.slow
def test_bad_files_are_skipped_listed_and_summarised_per_epoch(tiny_assets, tmp_path, caplog):
    import logging
    import shutil
    import sys

    sys.path.insert(0, str(Path(__file__).parents[1]))
    from test_data.files import BAD_FILES

    shapes = tmp_path / "shapes"
    shutil.copytree(tiny_assets["shapes"], shapes)
    with open(shapes / "metadata.jsonl", "a") as f:
        for name, (writer, _) in BAD_FILES.items():
            writer(shapes / name)
            f.write(json.dumps({"file_name": name, "text": "a broken file"}) + "\n")
    # 180 good + 1 readable-header-but-truncated image = 181; batch 4 → an epoch is 46 iterations
    cfg = tiny_cfg(tmp_path / "w", f"train_dataloader.dataset.path={shapes}", "train_cfg.max_iters=46",
                   "default_hooks.checkpoint.interval=100", "default_hooks.logger.interval=50", "sample_grid.prompts=[]",
                   "train_dataloader.dataset.buckets.weighting=1.0")
    with caplog.at_level(logging.INFO, logger="pgv25"):
        result = train(cfg)
    assert result.iteration == 46
    listed = (tmp_path / "w" / "skipped_files.txt").read_text().splitlines()
    assert f"empty file\t{shapes / 'zero.png'}" in listed and f"not an image\t{shapes / 'notes.png'}" in listed
    summary = [r.message for r in caplog.records if r.message.startswith("epoch 1 done") and r.name == "pgv25"]  # shown
    assert summary and "excluded by the scan 2 (1 empty file, 1 not an image)" in summary[0]
    # the truncated JPEG passes the scan and fails when decoded (drawn in this epoch with seed 0)
    assert f"truncated or corrupt image\t{shapes / 'cut.jpg'}" in listed
    assert "skipped 1 (1 truncated or corrupt image)" in summary[0]


def test_a_clean_epoch_is_summarised_in_train_log_not_in_the_terminal(tiny_assets, tmp_path, caplog):
    import logging
    import shutil

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rows = [json.loads(line) for line in (tiny_assets["shapes"] / "metadata.jsonl").read_text().splitlines()][:8]
    folder = tmp_path / "eight"
    folder.mkdir()
    for row in rows:
        shutil.copy(tiny_assets["shapes"] / row["file_name"], folder / row["file_name"])
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    # 8 images, batch 4: an epoch every 2 iterations, 3 of them, none with anything to report
    cfg = tiny_cfg(tmp_path / "w", f"train_dataloader.dataset.path={folder}", "train_cfg.max_iters=6",
                   "default_hooks.checkpoint.interval=100", "sample_grid.prompts=[]")
    with caplog.at_level(logging.INFO):
        train(cfg)
    # the terminal shows what propagates to the root logger; the summaries went to a logger that does not
    assert not [r for r in caplog.records if r.message.startswith("epoch ") and r.name != TRAIN_LOG_ONLY]
    assert not logging.getLogger(TRAIN_LOG_ONLY).propagate
    logged = [line for line in (tmp_path / "w" / "train.log").read_text().splitlines() if " epoch " in line]
    assert [line.split(" epoch ")[1] for line in logged] == [f"{e} done at iteration {2 * e}: no unreadable images" for e in (1, 2, 3)]
    events = EventAccumulator(str(next((tmp_path / "w" / "tensorboard").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("data/epoch")] == [(2, 1), (4, 2), (6, 3)]
    assert [e.value for e in events.Scalars("data/skipped_images_in_epoch")] == [0, 0, 0]


def test_streaming_a_local_parquet_dataset_trains_and_resumes(tiny_assets, tmp_path):
    import datasets

    datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN = 0  # see tests/test_data/test_streaming.py
    rows = [json.loads(line) for line in (tiny_assets["shapes"] / "metadata.jsonl").read_text().splitlines()]
    images = [{"bytes": (tiny_assets["shapes"] / r["file_name"]).read_bytes(), "path": r["file_name"]} for r in rows]
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    (tmp_path / "hub").mkdir()
    datasets.Dataset.from_dict({"image": images, "text": [r["text"] for r in rows]}, features=features).to_parquet(
        str(tmp_path / "hub" / "train.parquet"))
    options = ["train_dataloader.dataset.type=hub", f"train_dataloader.dataset.path={tmp_path / 'hub'}",
               "train_dataloader.dataset.streaming=True", "train_cfg.max_iters=4", "default_hooks.checkpoint.interval=2",
               "sample_grid.prompts=[]"]
    train(tiny_cfg(tmp_path / "w", *options, "train_cfg.max_iters=2"))
    state = json.loads((tmp_path / "w" / "checkpoints" / "iter_0000002" / "trainer_state.json").read_text())
    assert state["ranks"][0]["stream"] == {"0": [0, 8]}  # 2 iterations × batch 4 rows read, none left buffered
    result = train(tiny_cfg(tmp_path / "w", *options), resume=True)
    assert result.iteration == 4 and result.step_dir == tmp_path / "w" / "step4"


@pytest.mark.slow
def test_speed_switches_train_like_eager(tiny_assets, tmp_path, caplog):
    """The speed switches are numerically the same model: same losses (to float tolerance) as the eager run; their
    GPU-only defaults ('cuda') leave a CPU on the plain path."""
    import logging

    base = ["train_cfg.max_iters=2", "default_hooks.checkpoint.interval=2", "sample_grid.prompts=[]"]
    with caplog.at_level(logging.INFO, logger="pgv25"):
        eager = train(tiny_cfg(tmp_path / "eager", *base))
    assert not any("compiled with torch.compile" in r.message for r in caplog.records)  # compile.enabled='cuda'
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pgv25"):
        switched = train(tiny_cfg(tmp_path / "switched", *base, "model.channels_last=True", "model.compile.enabled=True",
                                  "model.compile.regions=[transformer,resnet]", "model.attention_backend=math",
                                  "model.compile.backend=aot_eager"))  # traced fwd+bwd graphs, no C++ build in the test
    assert any("blocks (transformer, resnet) compiled" in r.message for r in caplog.records)
    for a, b in zip(scalars(tmp_path / "eager"), scalars(tmp_path / "switched")):
        assert abs(a["loss"] - b["loss"]) < 1e-4 * abs(a["loss"])
    weights = unet_weights(switched.step_dir)
    assert set(weights) == set(unet_weights(eager.step_dir))  # no _orig_mod. prefixes in the export


def test_weights_and_biases_offline(tiny_assets, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    train(tiny_cfg(tmp_path, "log_with=[wandb]", "train_cfg.max_iters=2", "default_hooks.checkpoint.interval=2",
                   "sample_grid.prompts=[]", "validation.interval=2", "validation.prompts=[a red circle on a white background]"))
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, "an offline run, no network or login needed"
    images = sorted(p.name.split("_")[1] for p in (runs[0] / "files" / "media" / "images").glob("validation_*.png"))
    assert images == ["0", "2"]  # the validation grids at iterations 0 and 2
    record = next(runs[0].glob("run-*.wandb")).read_bytes()  # the run's log, synced later with `wandb sync`
    # which σ bands appear depends on the 8 σ drawn; that some do is the point
    assert b"train_cfg.max_iters" in record and b"loss_sigma/" in record and b"images_per_s" in record


def test_unknown_tracker_is_one_line(tiny_assets, tmp_path):
    from pgv25.errors import UserError

    with pytest.raises(UserError, match="unknown tracker 'mlflow'"):
        train(tiny_cfg(tmp_path, "log_with=[mlflow]"))


def test_export_switches_and_keys_older_than_a_checkpoint_do_not_block_its_resume():
    from pgv25.engine.resume import config_changes

    saved = {"model": {"lora": {"rank": 4, "fuse_export": False}}}  # written before kohya_export/use_dora existed
    now = {"model": {"lora": {"rank": 4, "fuse_export": True, "kohya_export": True, "use_dora": False}}}
    assert config_changes(saved, now) == []
    dora = {"model": {"lora": {"rank": 4, "fuse_export": False, "kohya_export": False, "use_dora": True}}}
    assert config_changes(saved, dora) == ["model.lora.use_dora: False -> True"]
    # speed switches recorded by older versions (channels_last, compile) are not part of the run's identity
    older = {"model": {"channels_last": False, "compile": {"enabled": False}, "noise_schedule": "edm"}}
    assert config_changes(older, {"model": {"noise_schedule": "edm"}}) == []
