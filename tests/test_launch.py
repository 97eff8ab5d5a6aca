"""`NPROC_PER_NODE=N pgv25 train ...`: the torchrun command line, launch detection, early errors."""

import sys

import pytest

from pgv25 import cli
from pgv25.errors import UserError
from pgv25.launch import inside_distributed_launch, torchrun_command

ARGV = ["train", "playgroundv2_5_tiny_shapes", "--work-dir", "w"]


def test_single_node_uses_a_free_local_port():
    command = torchrun_command(ARGV, {"NPROC_PER_NODE": "2"})
    assert command[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--nproc_per_node=2" in command and "--standalone" in command
    assert command[-6:] == ["-m", "pgv25.cli", *ARGV]


def test_multi_node_variables_are_honoured():
    env = {"NPROC_PER_NODE": "8", "NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29400"}
    command = torchrun_command(ARGV, env)
    for flag in ("--nproc_per_node=8", "--nnodes=2", "--node_rank=1", "--master_addr=10.0.0.1", "--master_port=29400"):
        assert flag in command
    assert "--standalone" not in command


@pytest.mark.parametrize("env, message", [
    ({"NPROC_PER_NODE": "two"}, "NPROC_PER_NODE must be an integer"),
    ({"NPROC_PER_NODE": "0"}, "NPROC_PER_NODE must be at least 1"),
    ({"NPROC_PER_NODE": "2", "NNODES": "2"}, "MASTER_ADDR"),
    ({"NPROC_PER_NODE": "2", "NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "h"}, "NODE_RANK=2 must be below NNODES=2"),
])
def test_bad_launch_variables_are_one_clear_error(env, message):
    with pytest.raises(UserError, match=message):
        torchrun_command(ARGV, env)


@pytest.mark.parametrize("env, inside", [
    ({}, False),
    ({"LOCAL_RANK": "0"}, True),
    ({"TORCHELASTIC_RUN_ID": "x"}, True),
    ({"RANK": "1", "WORLD_SIZE": "2"}, True),
    ({"RANK": "1"}, False),
])
def test_an_existing_launch_is_detected(env, inside):
    assert inside_distributed_launch(env) is inside


def test_a_config_mistake_fails_before_any_process_starts(monkeypatch, capsys):
    monkeypatch.setenv("NPROC_PER_NODE", "2")
    for name in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr("pgv25.launch.relaunch", lambda argv: pytest.fail("launched despite a bad config"))
    assert cli.main(["train", "playgroundv2_5_tiny_shape"]) == 2
    assert "did you mean" in capsys.readouterr().err


def test_resume_command_replaces_any_resume_argument(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    argv = ["train", "cfg", "--resume", "w/checkpoints/iter_0000002", "--cfg-options", "a=1"]
    assert cli.resume_command(argv) == "pgv25 train cfg --cfg-options a=1 --resume"
    assert cli.resume_command(["train", "cfg", "--resume", "--work-dir", "my dir"]) == "pgv25 train cfg --work-dir 'my dir' --resume"
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert cli.resume_command(["train", "cfg"]) == "NPROC_PER_NODE=2 pgv25 train cfg --resume"


def test_error_filter_keeps_one_line_per_mistake_and_whole_crashes():
    import io

    from pgv25.launch import ErrorFilter

    out = io.StringIO()
    errors = ErrorFilter(out)
    for line in ["a warning\n", "pgv25: error: bad column 'txt'\n", "pgv25: error: bad column 'txt'\n",
                 "Traceback (most recent call last):\n", "ChildFailedError\n"]:
        errors.feed(line)
    assert out.getvalue() == "a warning\npgv25: error: bad column 'txt'\n"
    crash = io.StringIO()
    errors = ErrorFilter(crash)
    for line in ["Traceback (most recent call last):\n", "ZeroDivisionError: division by zero\n"]:
        errors.feed(line)
    assert "ZeroDivisionError" in crash.getvalue() and not errors.errors


@pytest.mark.parametrize("name, message", [("deepspeed", "not supported yet; use strategy='fsdp'"), ("zero", "unknown")])
def test_unsupported_strategies_are_one_clear_error(name, message):
    from pgv25.engine.distributed import check_strategy

    with pytest.raises(UserError, match=message):
        check_strategy(name)
    assert check_strategy("fsdp") == "fsdp"
