"""The CLI's promises: one clear line and a non-zero exit for every user mistake, no traceback."""

import subprocess
import sys

import pytest

from conftest import TINY_OPTIONS
from pgv25.cli import main


def run(*args, **env):
    import os

    return subprocess.run([sys.executable, "-m", "pgv25.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)


def call(*args):
    """`pgv25 ARGS` in this process, for mistakes caught before anything loads: the same exit code and stderr as
    `run`, without a second of interpreter start-up per call (a traceback would fail the test as an exception)."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def one_line_error(result, *needles):
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_version_and_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and "pgv25" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "train" in capsys.readouterr().out


def test_unknown_config():
    one_line_error(call("train", "playgroundv2_5_pokemon"), "no config named", "did you mean")


def test_unknown_cfg_option():
    one_line_error(call("train", "playgroundv2_5_tiny_shapes", "--cfg-options", "train_cfg.max_itrs=2"), "no key")


def test_a_data_file_given_as_the_config_says_where_data_goes(tmp_path, monkeypatch):
    data = tmp_path / "data" / "train-00000-of-00001.parquet"
    data.parent.mkdir()
    data.write_bytes(b"PAR1")
    one_line_error(call("train", str(data)), f"{data} is a data file, not a config", "pgv25 list-cfg",
                   f"train_dataloader.dataset.path={data}")
    one_line_error(call("train", str(data.parent)), "is a folder, not a config", f"train_dataloader.dataset.path={data.parent}")
    (tmp_path / "playgroundv2_5_tiny_shapes").mkdir()  # e.g. a --work-dir named after the config: the name still wins
    monkeypatch.chdir(tmp_path)
    assert call("train", "playgroundv2_5_tiny_shapes", "--dry-run").returncode == 0
    (tmp_path / "images").mkdir()
    one_line_error(call("train", "images"), "images is a folder, not a config", "train_dataloader.dataset.path=images")
    (tmp_path / "notes.yaml").write_text("a: 1\n")
    one_line_error(call("train", str(tmp_path / "notes.yaml")), "not a .py file, not a config")


def test_list_cfg_without_configs_says_where_it_looked(tmp_path, monkeypatch):
    from pgv25 import config

    found = call("list-cfg")
    assert found.returncode == 0 and "playgroundv2_5_tiny_shapes" in found.stdout
    one_line_error(call("list-cfg", "no_such_name"), "no config name contains 'no_such_name'")
    # an install that ships no configs (and no ./configs here): not "no config matches 'None'"
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PGV25_CONFIG_DIR", raising=False)
    monkeypatch.setattr(config, "CHECKOUT_CONFIGS", tmp_path / "none")
    monkeypatch.setattr(config, "PACKAGED_CONFIGS", tmp_path / "none")
    one_line_error(call("list-cfg"), "no configs found (no configs/ folder here, none installed with pgv25); set PGV25_CONFIG_DIR")


def test_syntax_error(tmp_path):
    (tmp_path / "broken.py").write_text("train_cfg = dict(max_iters=\n")
    one_line_error(call("train", str(tmp_path / "broken.py")), "broken.py:", "syntax error")


def test_dry_run_prints_resolved_config(capsys):
    assert main(["train", "playgroundv2_5_pokemon_blip", "--dry-run", "--cfg-options", "train_cfg.max_iters=3"]) == 0
    out = capsys.readouterr().out
    assert "max_iters=3" in out and "playground-v2.5-1024px-aesthetic" in out


@pytest.mark.slow
def test_unreachable_hub_model_says_so_and_how_to_fix(tmp_path, tiny_assets):
    """The real recipe's hub id, on a machine without the hub (the dataset points at local files)."""
    result = run("train", "playgroundv2_5_pokemon_blip", "--work-dir", str(tmp_path / "w"), "--cfg-options",
                 "train_dataloader.dataset.type=folder", f"train_dataloader.dataset.path={tiny_assets['shapes']}", "train_dataloader.num_workers=0")
    one_line_error(result, "cannot reach the Hugging Face Hub", "playgroundai/playground-v2.5-1024px-aesthetic",
                   "model.pretrained_model_name_or_path=DIR")


@pytest.mark.slow
def test_unreachable_hub_dataset_says_so(tmp_path):
    # Not offline by configuration: the Hub's host cannot be resolved, as on a machine without network.
    result = run("train", "playgroundv2_5_pokemon_blip", "--work-dir", str(tmp_path / "w"), HF_HUB_OFFLINE="0",
                 HF_DATASETS_OFFLINE="0", HF_ENDPOINT="https://hub.invalid")
    one_line_error(result, "cannot reach the Hugging Face Hub", "lambdalabs/pokemon-blip-captions", "train_dataloader.dataset.path=DIR")


def test_model_folder_without_a_component(tmp_path, tiny_assets):
    import shutil

    broken = tmp_path / "model"
    shutil.copytree(tiny_assets["model"], broken)
    shutil.rmtree(broken / "vae")
    result = call("train", "playgroundv2_5_tiny_shapes", "--work-dir", str(tmp_path / "w"), "--cfg-options",
                  *TINY_OPTIONS, f"model.pretrained_model_name_or_path={broken}")
    one_line_error(result, "lacks vae/")


def test_unwritable_work_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    one_line_error(call("train", "playgroundv2_5_tiny_shapes", "--work-dir", str(blocker / "sub")), "not writable")


def test_generate_on_a_missing_model(tmp_path):
    one_line_error(call("generate", "--model", str(tmp_path / "none"), "--prompt", "x", "--out", str(tmp_path / "o.png")),
                   "does not exist")


def test_generate_eager_and_compile_exclude_each_other(tmp_path):
    one_line_error(call("generate", "--model", str(tmp_path), "--prompt", "x", "--out", str(tmp_path / "o.png"), "--eager",
                        "--compile"), "exclude each other")


def test_list_cfg_and_copy_cfg(tmp_path, capsys):
    assert main(["list-cfg"]) == 0
    assert "playgroundv2_5_tiny_shapes" in capsys.readouterr().out
    dest = tmp_path / "mine.py"
    assert main(["copy-cfg", "playgroundv2_5_pokemon_blip", str(dest)]) == 0
    text = dest.read_text()
    assert "_base_" not in text and "playground-v2.5-1024px-aesthetic" in text
    from pgv25.config import load_config

    assert load_config(str(dest)).train_cfg.max_iters == 10000
    assert main(["copy-cfg", "playgroundv2_5_pokemon_blip", str(dest)]) == 2  # never overwrites


def test_data_inspect_prints_buckets_and_writes_the_histogram(tmp_path, tiny_assets):
    import json

    from PIL import Image

    folder = tmp_path / "mixed"
    folder.mkdir()
    rows = []
    for i, size in enumerate([(96, 48)] * 6 + [(48, 96)] * 3 + [(64, 64)] * 9):
        Image.new("RGB", size, (i, 0, 0)).save(folder / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": f"image {i}"})
    (folder / "9.png").write_bytes(b"")
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "hist.png"
    result = call("data", "inspect", "playgroundv2_5_tiny_shapes", "--out", str(out), "--cfg-options",
                  f"train_dataloader.dataset.path={folder}", "train_dataloader.batch_size=2",
                  "train_dataloader.dataset.buckets.weighting=uniform", *TINY_OPTIONS)
    assert result.returncode == 0, result.stderr
    assert "18 rows, 17 usable, excluded 1 (1 empty file)" in result.stdout
    lines = {line.split()[0]: line.split() for line in result.stdout.splitlines() if "x" in line.split()[0][:5]}
    assert lines["80x48"][2:5] == ["6", "35.3%", "33.3%"] and lines["64x64"][2] == "8"  # one square unreadable
    assert Image.open(out).size[0] > 300 and (tmp_path / "excluded_rows.txt").read_text().startswith("empty file\t")


def test_data_commands_refuse_a_streaming_config():
    result = call("data", "inspect", "playgroundv2_5_pokemon_blip", "--cfg-options", "train_dataloader.dataset.streaming=True")
    one_line_error(result, "streams its dataset: there is no scan to inspect or cache")


@pytest.mark.slow
def test_the_terminal_carries_our_lines_and_real_warnings_not_library_chatter():
    """As a plain `pgv25` process configures it: other libraries' INFO lines stay out of the terminal, their warnings
    reach it, and importing diffusers' models (which imports bitsandbytes, which with `kernels` installed reaches for
    the Hub) adds nothing."""
    script = (
        "import logging\n"
        "from pgv25.cli import configure_logging\n"
        "configure_logging()\n"
        "from diffusers import UNet2DConditionModel\n"  # imports bitsandbytes when installed (diffusers' quantizer registry)
        "logging.getLogger('pgv25').info('ours: progress')\n"
        "logging.getLogger('pgv25.engine').info('ours: a module of ours')\n"
        "logging.getLogger('somelib').info('chatter')\n"
        "logging.getLogger('somelib.sub').warning('a real warning')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    lines = [line.split(" ", 1)[1] for line in result.stdout.splitlines()]
    assert lines == ["ours: progress", "ours: a module of ours", "a real warning"], result.stdout + result.stderr
    assert "kernels" not in result.stderr and "gemm_4bit" not in result.stderr
