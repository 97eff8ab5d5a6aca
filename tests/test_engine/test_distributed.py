"""Two CPU processes training together (gloo): agreement across ranks, sharding, exact resume, preemption."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY_OPTIONS, wait_for_logged_iterations

pytestmark = pytest.mark.slow  # launches processes or builds venvs: the full suite only (pytest -m 'not slow' skips it)

HERE = Path(__file__).resolve().parent
SMALL = TINY_OPTIONS + ["train_dataloader.batch_size=4", "default_hooks.logger.interval=1", "sample_grid.prompts=[]",
                        "validation.interval=0"]


def run_worker(tmp_path, strategy: str, *options: str, steps: int = 2) -> tuple[dict, Path]:
    out, work = tmp_path / f"{strategy}.json", tmp_path / strategy
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(HERE / "dist_worker.py"), str(out), str(work), strategy, str(steps), *options],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(out.read_text()), work / "final.safetensors"


def launch_env() -> dict:
    """Built per call: os.environ gets the session's PGV25_CACHE only once the fixtures have run."""
    return {**os.environ, "NPROC_PER_NODE": "2", "OMP_NUM_THREADS": "1"}


def train_command(work: Path, *options: str, resume: str | None = None) -> list[str]:
    command = [sys.executable, "-m", "pgv25.cli", "train", "playgroundv2_5_tiny_shapes", "--work-dir", str(work),
               "--cfg-options", *SMALL, *options]
    return command + (["--resume", resume] if resume else [])


def pgv25_train(work: Path, *options: str, resume: str | None = None) -> subprocess.Popen:
    return subprocess.Popen(train_command(work, *options, resume=resume), env=launch_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(process: subprocess.Popen, timeout: int = 300) -> str:
    out, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, out[-4000:]
    return out


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(command) -> list[str]:
    """Run `command(env)` as two nodes of one process each on this machine (NNODES=2, NODE_RANK=0/1); their outputs."""
    port, nodes = str(free_port()), []
    for rank in (0, 1):
        env = {**launch_env(), "NPROC_PER_NODE": "1", "NNODES": "2", "NODE_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": port}
        nodes.append(subprocess.Popen(command(env), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return [finish(node) for node in nodes]


@pytest.fixture(scope="module")
def ddp_worker(tiny_assets, tmp_path_factory):
    """DDP over two launchers as two nodes of one process each, under the torchrun command that `pgv25 train` builds
    from NNODES/NODE_RANK/MASTER_* (without its `-m pgv25.cli`). Its ranks are those of one node with two processes,
    so this one run serves as the DDP reference of the tests below as well as the multi-node test."""
    from pgv25.launch import torchrun_command

    tmp_path = tmp_path_factory.mktemp("ddp_worker")
    record, work = tmp_path / "ddp.json", tmp_path / "ddp"
    two_nodes(lambda env: [*torchrun_command([], env)[:-2], str(HERE / "dist_worker.py"), str(record), str(work),
                           "ddp", "2", *SMALL])
    return json.loads(record.read_text()), work / "final.safetensors"


def test_ddp_ranks_on_two_nodes_read_distinct_shards_and_hold_identical_weights(ddp_worker):
    record, _ = ddp_worker
    captions = record["captions"]
    assert len(captions) == 2 and captions[0] != captions[1], "both nodes read the same samples"
    for step in record["steps"]:
        assert step["local_loss"][0] != step["local_loss"][1]  # different data ...
        assert step["mean_loss"][0] == step["mean_loss"][1]  # ... one logged loss
        assert step["weights"][0] == step["weights"][1]  # ... and the same weights after every update


def test_fsdp_trains_the_same_model_as_ddp(tiny_assets, ddp_worker, tmp_path):
    """ZeRO-3 (parameters resharded after the forward); ZeRO-2 is set against DDP in the FSDP resume test."""
    ddp_record, ddp_weights = ddp_worker
    fsdp_record, fsdp_weights = run_worker(tmp_path, "fsdp", "fsdp.reshard_after_forward=True")
    # Same weights and data before the first update: the same first loss, up to the float32 rounding of a forward
    # pass whose parameters FSDP gathers into other buffers (the same kernels give the same bits here, but that is
    # not a promise of the kernels).
    (first_fsdp, _), (first_ddp, _) = fsdp_record["steps"][0]["mean_loss"], ddp_record["steps"][0]["mean_loss"]  # per rank
    assert abs(first_fsdp - first_ddp) <= 1e-5 * abs(first_ddp)
    for step in fsdp_record["steps"]:
        assert step["weights"][0] == step["weights"][1]  # the gathered model is one model
    a, b = load_file(ddp_weights), load_file(fsdp_weights)
    assert set(a) == set(b)
    base = load_file(tiny_assets["model"] / "unet" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(a[k], base[k]) for k in a)
    # Sharded reduction sums in another order: equal to float32 rounding, not to the bit.
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4


def scalars(work: Path) -> list[dict]:
    lines = (work / "scalars.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in ("images_per_s", "loader_wait")} for line in lines]


RESUMABLE = ["train_cfg.max_iters=4", "default_hooks.checkpoint.interval=2"]
# FSDP's straight run keeps the gathered parameters through the backward (ZeRO-2): the resume test then also
# covers the variant the same-model test above does not.
STRATEGY = {"ddp": ["strategy=ddp"], "fsdp": ["strategy=fsdp", "fsdp.reshard_after_forward=False"]}


@pytest.fixture(scope="module")
def straight_run(tiny_assets, tmp_path_factory):
    """`NPROC_PER_NODE=2 pgv25 train` for 4 iterations with checkpoints at 2 and 4, once per strategy."""
    runs = {}

    def run(strategy: str) -> tuple[Path, str]:
        if strategy not in runs:
            work = tmp_path_factory.mktemp(f"straight_{strategy}")
            runs[strategy] = work, finish(pgv25_train(work, *RESUMABLE, *STRATEGY[strategy]))
        return runs[strategy]

    return run


def export_of(work: Path, iteration: int = 4) -> dict:
    return load_file(work / f"step{iteration}" / "unet" / "diffusion_pytorch_model.safetensors")


# DDP's two-process resume is proven by the two-node test below (it resumes the DDP run's checkpoint on two nodes)
@pytest.mark.parametrize("strategy", ["fsdp"])
def test_two_process_resume_is_exact(straight_run, tmp_path, strategy):
    straight, log = straight_run(strategy)
    assert log.count("iter 4/4") == 1, "only rank 0 logs progress"
    state = json.loads((straight / "checkpoints" / "iter_0000004" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and [r["consumed"] for r in state["ranks"]] == [4, 4]

    resumed = tmp_path / "resumed"
    shutil.copytree(straight / "checkpoints" / "iter_0000002", resumed / "checkpoints" / "iter_0000002")
    finish(pgv25_train(resumed, *RESUMABLE, *STRATEGY[strategy], resume=str(resumed / "checkpoints" / "iter_0000002")))
    a, b = export_of(straight), export_of(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed 2-process run differs from the uninterrupted one"
    assert scalars(resumed) == scalars(straight)[2:]
    # ZeRO-2 trains DDP's model: equal to float32 rounding (sharded reductions sum in another order)
    ddp = export_of(straight_run("ddp")[0])
    assert set(ddp) == set(a) and max((ddp[k] - a[k]).abs().max().item() for k in a) < 1e-4


def test_two_nodes_resume_like_two_local_processes(straight_run, tmp_path):
    """Two launchers as two nodes, over gloo (their training is the `ddp_worker` fixture's): exact resume.

    The ranks are the same as in a one-node run of two processes, so the result must be that run's to the bit.
    """
    # `pgv25 train` on both nodes, resuming the one-node two-process run's checkpoint at 2: the same ranks, so the
    # same model at 4 to the bit (one run proves both the two-node training and its resume)
    one_node, _ = straight_run("ddp")
    resumed = tmp_path / "resumed"
    shutil.copytree(one_node / "checkpoints" / "iter_0000002", resumed / "checkpoints" / "iter_0000002")
    node0, node1 = two_nodes(lambda env: train_command(resumed, *RESUMABLE, resume=str(resumed / "checkpoints" / "iter_0000002")))
    assert "iter 4/4" in node0 and "iter 4/4" not in node1, "only global rank 0 logs"
    state = json.loads((resumed / "checkpoints" / "iter_0000004" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and [r["consumed"] for r in state["ranks"]] == [4, 4]
    a, c = export_of(one_node), export_of(resumed)
    assert all(torch.equal(a[k], c[k]) for k in a), "two nodes resumed into another model than two local processes trained"
    assert scalars(resumed) == scalars(one_node)[2:]


def test_sigterm_to_the_launcher_stops_all_ranks_with_a_checkpoint(tiny_assets, tmp_path):
    work = tmp_path / "preempted"
    process = pgv25_train(work, "train_cfg.max_iters=100000", "default_hooks.checkpoint.interval=100000")
    wait_for_logged_iterations(process, work, 2)
    process.send_signal(signal.SIGTERM)
    out = finish(process, timeout=120)
    assert "resume with: NPROC_PER_NODE=2 pgv25 train playgroundv2_5_tiny_shapes" in out
    (checkpoint,) = (work / "checkpoints").iterdir()
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["iteration"] >= 2 and len(state["ranks"]) == 2
    assert not list(work.glob("step*")), "a preempted run writes a checkpoint, not an export"


def test_a_mistake_under_the_launcher_is_one_line_and_exit_2(tiny_assets, tmp_path):
    command = train_command(tmp_path, resume=str(tmp_path / "missing"))
    result = subprocess.run(command, env=launch_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [f"pgv25: error: --resume: checkpoint {tmp_path / 'missing'} does not exist"]


def test_text_encoder_lora_stays_identical_across_ranks(tiny_assets, tmp_path):
    """The text encoders are outside the DDP module: their adapters' gradients are averaged by hand."""
    record, weights = run_worker(tmp_path, "ddp", "model.lora.enabled=True", "model.lora.text_encoders=True",
                                 "optim_wrapper.optimizer.lr=1e-2")
    assert any(name.startswith("text_encoder_2.") and "lora_B" in name for name in load_file(weights))
    for step in record["steps"]:
        assert step["local_loss"][0] != step["local_loss"][1]
        assert step["weights"][0] == step["weights"][1]


def test_dpo_with_lora_stays_identical_across_ranks(tiny_assets, tmp_path):
    """DPO's reference (the same UNet, adapters off, no gradients) runs inside the DDP forward."""
    record, weights = run_worker(tmp_path, "ddp", "config=playgroundv2_5_dpo_tiny_shapes", "model.lora.enabled=True",
                                 "optim_wrapper.optimizer.lr=1e-2", "train_dataloader.batch_size=2")
    assert any("lora_B" in name for name in load_file(weights))
    for number, step in enumerate(record["steps"]):
        if number:  # at the first step the adapters are zero: every pair a tie, log 2 on both ranks
            assert step["local_loss"][0] != step["local_loss"][1]
        assert step["mean_loss"][0] == step["mean_loss"][1]
        assert step["weights"][0] == step["weights"][1]
