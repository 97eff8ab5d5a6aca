"""tools/gpu_check.py's pieces that a GPU call cannot afford to find broken: its options, the comparisons it
draws and the summary row it writes (the GPU runs themselves are not part of the suite)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

import gpu_check  # noqa: E402


def test_runner_variants_take_a_batch_after_at():
    assert gpu_check.runner_variant("24gb@2") == ("24gb", 2)
    assert gpu_check.runner_variant("cache") == ("cache", None)
    for bad in ("nope", "24gb@0", "24gb@two", "cache@"):
        with pytest.raises(Exception, match="optionally with @BATCH"):
            gpu_check.runner_variant(bad)
    with pytest.raises(SystemExit):  # argparse turns the type error into its usage line
        gpu_check.main(["--out", "unused", "--runner-variants", "24gb@-1"])


def test_the_24gb_variant_is_the_24gb_config():
    """The runner variant measures what users run: the 24 GB config's levers on the base config."""
    from pgv25.config import load_config, parse_cfg_options

    config = load_config("playgroundv2_5_pokemon_blip_24gb")
    variant = load_config("playgroundv2_5_pokemon_blip", parse_cfg_options(gpu_check.RUNNER_VARIANTS["24gb"]))
    assert variant.model.to_dict() == config.model.to_dict()
    assert variant.optim_wrapper.to_dict() == config.optim_wrapper.to_dict()


def bench_row(variant, images_per_s, **extra):
    return {"variant": variant, "batch": 4, "size": "1024x1024", "images_per_s": images_per_s, **extra}


def test_runners_are_read_against_their_own_bare_step_at_the_same_batch():
    stages = {
        "bench": {"rows": [bench_row("full", 8.0, reference_images_per_s=8.0, speedup_vs_reference=1.0),
                           bench_row(gpu_check.DEFAULTS_VARIANT, 12.0, rounds=3, spread=0.04, speedup_vs_reference=1.5)]},
        "runner_cache": {"images_per_s_median": 11.4, "batch": 4},
        "runner_eager": {"images_per_s_median": 7.6, "batch": 4},
        "runner_24gb@1": {"images_per_s_median": 4.0, "batch": 1, "gpu_peak_gib": 11.2, "planned_gib": 11.9},
        "runner_float8": {"error": "exit 1"},
    }
    ratios = gpu_check.runner_ratios(stages)
    assert ratios == {f"runner_cache / {gpu_check.DEFAULTS_VARIANT}": 0.95, "runner_eager / full": 0.95}

    row = gpu_check.summary_row({"stages": {"env": {"gpu": "NVIDIA H100 80GB HBM3"}, **stages,
                                            "generate_pgv25": {"levers_s": 2.61, "levers+compile_s": 2.3}},
                                 "runner_vs_bare_step": ratios}, "2026-12-07")
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells == ["H100 80GB HBM3", "2026-12-07", "12.00 (3 rounds, spread 4%)", "4", "1.50", "0.95 (cache)",
                     "11.2 (batch 1, planned 11.9)", "2.61 (pgv25 generate; 2.30 compiled)"]


def test_the_24gb_column_takes_the_smallest_batch_measured_with_the_24gb_levers():
    stages = {"train": {"variant": "24gb", "batch": 1, "gpu_peak_gib": 10.9, "planned_gib": 11.4},
              "runner_24gb@2": {"batch": 2, "gpu_peak_gib": 17.0},
              "runner_cache@1": {"batch": 1, "gpu_peak_gib": 40.0}}  # not the 24 GB levers
    assert gpu_check.summary_row({"stages": stages}, "d").split(" | ")[6] == "10.9 (batch 1, planned 11.4)"
    stages["train"]["variant"] = None  # the default full fine-tune's main run
    assert gpu_check.summary_row({"stages": stages}, "d").split(" | ")[6] == "17.0 (batch 2)"


def test_the_summary_row_is_blank_where_nothing_was_measured():
    row = gpu_check.summary_row({"stages": {"env": {"gpu": "NVIDIA H200"}, "bench": {"rows": [{"variant": "full", "error": "OOM"}]}}},
                                "2026-12-07")
    assert row == "| H200 | 2026-12-07 |  |  |  |  |  |  |"


def test_float8_is_compared_with_the_bf16_runner_over_the_same_steps():
    stages = {"runner_cache": {"images_per_s_median": 10.0, "losses": [0.5, 0.4, 0.2]},
              "runner_float8": {"images_per_s_median": 12.5, "losses": [0.505, 0.4, 0.19]}}
    result = gpu_check.float8_against_bf16(stages)
    assert result["speed_ratio"] == 1.25 and result["compared_losses"] == 3
    assert result["max_relative_loss_difference"] == pytest.approx(0.05)
    assert result["median_relative_loss_difference"] == pytest.approx(0.01)
    assert gpu_check.float8_against_bf16({"runner_cache": stages["runner_cache"]}) is None


@pytest.mark.slow
def test_eval_generate_stage_times_the_images_after_the_first(tiny_assets, tmp_path):
    result = gpu_check.stage_eval_generate(tiny_assets["model"], tmp_path, 64, 2, 5, 300, tmp_path / "log", batch=2)
    assert "error" not in result, result
    assert result["images"] == 5 and result["images_per_s"] > 0 and result["batch"] == 2
    # 30,000 images over 8 GPUs at this rate (hours to 2 decimals; images/s to 3)
    assert result["mjhq30k_hours_on_8_gpus"] == pytest.approx(30_000 / 8 / result["images_per_s"] / 3600, rel=0.01, abs=0.006)
    assert sorted(p.parent.name for p in (tmp_path / "eval_images").glob("*/*.png")) == ["animals", "animals", "food", "people", "people"]
