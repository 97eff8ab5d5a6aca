"""The experiment runner and the reference loop run end to end on the tiny assets (few iterations)."""

import json
import sys
from pathlib import Path

import pytest

from conftest import TINY_OPTIONS

pytestmark = pytest.mark.slow  # launches processes or builds venvs: the full suite only (pytest -m 'not slow' skips it)

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
SMALL = ["--iters", "2", "--per-prompt", "1", "--eval-steps", "2", "--eval-limit", "1",
         "--cfg-options", *TINY_OPTIONS, "train_dataloader.batch_size=4"]


def test_reference_loop_trains_and_saves_a_pipeline(tiny_assets, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    import reference_edm

    reference_edm.main(["--model", str(tiny_assets["model"]), "--data", str(tiny_assets["shapes"]), "--out", str(tmp_path),
                        "--iters", "2", "--batch", "4"])
    pipe = StableDiffusionXLPipeline.from_pretrained(tmp_path)
    assert pipe.scheduler.__class__.__name__ == "EDMDPMSolverMultistepScheduler"  # saved as loaded


def test_experiment_writes_docs_and_does_not_retrain_a_scored_arm(tiny_assets, tmp_path):
    import experiments

    args = ["goal", "--work-dir", str(tmp_path / "work"), "--docs", str(tmp_path / "docs"), *SMALL]
    experiments.main(args)
    record = json.loads((tmp_path / "work" / "goal" / "record.json").read_text())
    scores = record["arms"]["default"]["scores"]
    assert list(scores) == ["1:1 seen", "1:1 held-out"] and scores["1:1 seen"]["images"] == 1
    doc = (tmp_path / "docs" / "goal.md").read_text()
    assert "| default | 1:1 seen (1 images) |" in doc and "python tools/experiments.py goal" in doc
    assert (tmp_path / "docs" / "goal.png").stat().st_size > 0
    assert (tmp_path / "docs" / "goal_default_samples_1x1.png").is_file()
    export = Path(record["arms"]["default"]["step_dir"]) / "unet" / "diffusion_pytorch_model.safetensors"
    written = export.stat().st_mtime_ns
    experiments.main(args)  # scored arms are kept: nothing trains again
    assert export.stat().st_mtime_ns == written
    assert json.loads((tmp_path / "work" / "goal" / "record.json").read_text())["arms"] == record["arms"]


@pytest.mark.parametrize("experiment", ["parity", "buckets"])
def test_parity_and_bucket_experiments_run(tiny_assets, tmp_path, experiment):
    import experiments

    extra = ["--arms", "balanced_buckets"] if experiment == "buckets" else []
    experiments.main([experiment, "--work-dir", str(tmp_path), "--docs", str(tmp_path / "docs"), *extra, *SMALL])
    record = json.loads((tmp_path / experiment / "record.json").read_text())
    if experiment == "parity":
        assert set(record["arms"]) == {"pgv25", "reference"}
        assert record["timing"]["ratio_pgv25_over_reference"] > 0 and record["timing"]["iterations"] == 2
        assert "ratio" in (tmp_path / "docs" / "parity.md").read_text()
    else:
        assert list(record["arms"]["balanced_buckets"]["scores"]) == [
            "1:1 seen", "1:1 held-out", "2:1 seen", "2:1 held-out", "1:2 seen", "1:2 held-out"]
        assert (tmp_path / "docs" / "buckets_balanced_buckets_samples_2x1.png").is_file()


def test_preference_experiment_trains_a_start_then_aligns_it(tiny_assets, tmp_path):
    import experiments

    experiments.main(["preference", "--work-dir", str(tmp_path), "--docs", str(tmp_path / "docs"), "--start-iters", "2",
                      "--arms", "nothing", "dpo_edm", *SMALL])
    record = json.loads((tmp_path / "preference" / "record.json").read_text())
    assert set(record["arms"]) == {"nothing", "dpo_edm"}
    assert record["arms"]["nothing"]["step_dir"] == record["start"]["step_dir"]  # scored as it is
    assert [i for i, _ in record["arms"]["dpo_edm"]["implicit_accuracy"]] == [2]  # logged at the last iteration
    assert "objective.loss_weighting" in record["arms"]["dpo_edm"]["options"]
    assert (tmp_path / "docs" / "preference_accuracy.png").stat().st_size > 0


def test_matched_beta_weighs_the_median_sigma_alike():
    import experiments

    # lognormal σ, median e^−1.2 ≈ 0.30: 1/σ² ≈ 11.0 against 1/σ² + 4 ≈ 15.0
    assert 0.70 < experiments.matched_beta(1.0, {"type": "lognormal", "P_mean": -1.2, "P_std": 1.2}) < 0.76


def test_dreambooth_experiment_teaches_a_start_a_new_shape_with_and_without_prior(tiny_assets, tmp_path):
    import experiments

    experiments.main(["dreambooth", "--work-dir", str(tmp_path), "--docs", str(tmp_path / "docs"), "--start",
                      str(tiny_assets["model"]), "--instance-images", "4", "--class-images", "4", *SMALL])  # SMALL: batch 4
    record = json.loads((tmp_path / "dreambooth" / "record.json").read_text())
    assert set(record["arms"]) == {"nothing", "no_prior", "prior"}
    assert len(list((tmp_path / "dreambooth" / "instance_images").glob("*.png"))) == 4
    assert len(list((tmp_path / "dreambooth" / "class_images").glob("*.png"))) == 4  # drawn by the start for the prior arm
    for arm in record["arms"].values():
        assert {"1:1 seen", "1:1 held-out", "trigger, instance prompt", "trigger, other colours"} <= set(arm["scores"])
        assert 0.0 <= arm["leak"] <= 1.0
    assert record["arms"]["prior"]["options"]["objective.class_prompt"] == experiments.CLASS_PROMPT
    text = (tmp_path / "docs" / "dreambooth.md").read_text()
    assert "concept share, instance prompt" in text and "| no_prior |" in text
    # both arms measured the class images' loss before the first iteration and at the end, on the same images, noise
    # and σ grid: from the same start, the first measurement is the same number
    curves = {}
    for arm, key in experiments.CLASS_CURVE.items():
        rows = [json.loads(line) for line in (tmp_path / "dreambooth" / arm / "scalars.jsonl").read_text().splitlines()]
        curves[arm] = [(row["iteration"], row[key]) for row in rows if key in row]
        assert [i for i, _ in curves[arm]] == [0, 2]
    assert curves["prior"][0][1] == pytest.approx(curves["no_prior"][0][1], rel=1e-5)
    assert "class-image loss" in text and (tmp_path / "docs" / "dreambooth_class_loss.png").stat().st_size > 0


def test_fid_experiment_measures_every_model_against_real_shapes(tiny_assets, tmp_path):
    import experiments

    at = SMALL.index("--eval-limit")
    small = SMALL[:at] + SMALL[at + 2:]  # --eval-limit 6 instead: 6 combinations
    experiments.main(["fid", "--work-dir", str(tmp_path), "--docs", str(tmp_path / "docs"), "--eval-limit", "6",
                      "--feature-images", "100", *small])
    record = json.loads((tmp_path / "fid" / "record.json").read_text())
    assert list(record["arms"]) == ["real", "base", "ddpm", "edm", "default"]
    report = json.loads((tmp_path / "fid" / "report" / "fid.json").read_text())
    assert report["reference"]["images"] == 6  # the first 6 combinations, 1 per prompt: 5 circles and 1 square
    for name in record["arms"]:
        assert report["models"][name]["scores"]["overall"]["fid"] >= 0
        assert len(list((tmp_path / "fid" / name / "images").rglob("*.png"))) == 6
        assert record["arms"][name]["scores"]["1:1 (all prompts)"]["images"] == 6
    text = (tmp_path / "docs" / "fid.md").read_text()
    assert "Best to worst by FID" in text and "| default |" in text and (tmp_path / "docs" / "fid_per_category.png").is_file()


def test_precision_experiment_compares_fp32_and_bf16_weights_over_seeds(tiny_assets, tmp_path):
    import experiments

    arms = [f"{p}_lr0.001_seed0" for p in experiments.PRECISIONS]
    experiments.main(["precision", "--work-dir", str(tmp_path), "--docs", str(tmp_path / "docs"), "--seeds", "0",
                      "--arms", *arms, *SMALL])
    record = json.loads((tmp_path / "precision" / "record.json").read_text())
    assert sorted(record["arms"]) == sorted(arms)
    assert record["arms"]["bf16_stochastic_lr0.001_seed0"]["options"]["optim_wrapper.rounding"] == "stochastic"
    assert all(arm["final_loss"] > 0 for arm in record["arms"].values())
    text = (tmp_path / "docs" / "precision.md").read_text()
    assert "| bf16_nearest | 0.001 | 1 |" in text and (tmp_path / "docs" / "precision_loss.png").stat().st_size > 0


def test_alignment_experiment_trains_every_arm_from_on_policy_pairs(tiny_assets, tmp_path, monkeypatch):
    """The arms train from the pairs and the curated set and are measured; the pairs themselves (pgv25 data pairs) are
    tested end to end in tests/test_data/test_sample_pairs.py, so here they are four fixed ones of the dataset's
    images: an untrained start's samples may hold no black background to prefer."""
    import alignment
    import experiments

    def fixed_pairs(start, work, samples, folder="pairs"):
        out = work / folder
        out.mkdir(parents=True, exist_ok=True)
        images = sorted(tiny_assets["shapes"].glob("red_*.png"))
        black = [p for p in images if "_on_black_" in p.name][:4]
        other = [p for p in images if "_on_black_" not in p.name][:4]
        (out / "pairs.jsonl").write_text("".join(json.dumps({"chosen": str(b), "rejected": str(o), "text": "a red circle"}) + "\n"
                                                 for b, o in zip(black, other)))
        (out / "top.jsonl").write_text("".join(json.dumps({"image": str(b), "text": "a red circle"}) + "\n" for b in black))
        return {"folder": str(out), "prompts": 1, "samples": 8, "scored": 8, "pairs": 4, "top": 4}

    monkeypatch.setattr(alignment, "make_pairs", fixed_pairs)
    experiments.main(["alignment", "--work-dir", str(tmp_path), "--docs", str(tmp_path / "docs"), "--start",
                      str(tiny_assets["model"]), "--seeds", "0", "--open-samples", "1", "--round2-seeds",
                      "--arms", "curated", "dpo_full", "dpo_lora", *SMALL])  # dpo_full_lr10: dpo_full at another lr
    record = json.loads((tmp_path / "alignment" / "record.json").read_text())
    assert set(record["arms"]) == {"nothing", "curated", "dpo_full", "dpo_lora"}
    for arm in record["arms"].values():
        seed = next(iter(arm["seeds"].values()))
        assert seed["open_held_out"]["images"] == 3 and 0 <= seed["open_pairs"]["preferred_share"] <= 1
        assert seed["explicit"]["images"] == 2  # --eval-limit 1: one explicit prompt, two seeds
    text = (tmp_path / "docs" / "alignment.md").read_text()
    assert "| dpo_lora | 1 |" in text and (tmp_path / "docs" / "alignment.png").stat().st_size > 0
