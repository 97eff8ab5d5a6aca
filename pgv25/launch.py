"""`NPROC_PER_NODE=N pgv25 train ...`: run the same command under torchrun with N processes.

This process stays as a small supervisor. torchrun starts each worker in a session of its own, so
a Ctrl-C in the terminal reaches only us; we forward the first SIGINT/SIGTERM to the *workers*
(which finish their step, checkpoint together and exit 0, so torchrun exits 0 too) and answer a
second one by killing the whole tree at once. Forwarding to torchrun instead would make it SIGKILL
the workers after its shutdown timeout and exit non-zero even when they stopped cleanly.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from .errors import UserError

LAUNCH_VARS = ("NPROC_PER_NODE", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT")


def inside_distributed_launch(env=os.environ) -> bool:
    """True under torchrun, `accelerate launch` or any launcher that already set up the ranks."""
    return "TORCHELASTIC_RUN_ID" in env or "LOCAL_RANK" in env or ("RANK" in env and "WORLD_SIZE" in env)


def _positive_int(env, name: str, default: int | None = None, minimum: int = 1) -> int:
    raw = env.get(name)
    if raw in (None, ""):
        if default is None:
            raise UserError(f"{name} is required for a multi-node launch")
        return default
    try:
        value = int(raw)
    except ValueError:
        raise UserError(f"{name} must be an integer, got '{raw}'") from None
    if value < minimum:
        raise UserError(f"{name} must be at least {minimum}, got {value}")
    return value


def torchrun_command(argv: list[str], env=os.environ) -> list[str]:
    """The torchrun command line for `pgv25 <argv>` from the launch variables in `env`."""
    nproc = _positive_int(env, "NPROC_PER_NODE")
    nnodes = _positive_int(env, "NNODES", 1)
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    if nnodes == 1 and not env.get("MASTER_PORT"):
        command.append("--standalone")  # a free local port: concurrent single-node runs never collide
    else:
        node_rank = _positive_int(env, "NODE_RANK", 0, minimum=0)
        if node_rank >= nnodes:
            raise UserError(f"NODE_RANK={node_rank} must be below NNODES={nnodes}")
        if nnodes > 1 and not env.get("MASTER_ADDR"):
            raise UserError("MASTER_ADDR (the address of the node with NODE_RANK=0) is required when NNODES > 1")
        command += [f"--nnodes={nnodes}", f"--node_rank={node_rank}", f"--master_addr={env.get('MASTER_ADDR', '127.0.0.1')}",
                    f"--master_port={_positive_int(env, 'MASTER_PORT', 29500)}"]
    return command + ["-m", "pgv25.cli", *argv]


def children(pid: int) -> list[int]:
    """Direct children of `pid` (Linux /proc; elsewhere none are found and torchrun itself is signalled)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


class ErrorFilter:
    """Workers' stderr, passed through until the first `pgv25: error:` line.

    Every rank reports the same mistake, and torchrun follows it with its own traceback and failure
    table; the user should see the one line. A worker that crashes with a real traceback prints no
    such line, so that traceback (and torchrun's report) still comes through whole.
    """

    PREFIX = "pgv25: error:"

    def __init__(self, out=sys.stderr):
        self.out, self.errors = out, []

    def feed(self, line: str) -> None:
        if line.startswith(self.PREFIX):
            if line not in self.errors:
                self.errors.append(line)
                self.out.write(line)
                self.out.flush()
        elif not self.errors:
            self.out.write(line)
            self.out.flush()

    def pump(self, stream) -> threading.Thread:
        thread = threading.Thread(target=lambda: [self.feed(line) for line in stream], daemon=True)
        thread.start()
        return thread


def relaunch(argv: list[str]) -> int:
    """Run `pgv25 <argv>` under torchrun and supervise it; returns torchrun's exit status."""
    command = torchrun_command(argv)
    env = dict(os.environ)
    nproc = int(env["NPROC_PER_NODE"])
    # torchrun would set 1 thread per worker and warn; on a CPU give each worker its share of the cores.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    # If torchrun itself is signalled (a scheduler signalling every process), it SIGKILLs the workers
    # after this many seconds: long enough for a full-size checkpoint, not torchrun's 30.
    env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "600")
    print(f"pgv25: launching {nproc} process(es) per node with torchrun", flush=True)
    child = subprocess.Popen(command, env=env, start_new_session=True, stderr=subprocess.PIPE, text=True, bufsize=1)
    errors = ErrorFilter()
    reader = errors.pump(child.stderr)
    signals_seen = 0

    def forward(signum, frame):
        nonlocal signals_seen
        signals_seen += 1
        workers = children(child.pid)
        if signals_seen == 1:
            _signal_all(workers or [child.pid], signal.SIGTERM)
        else:  # second Ctrl-C: abort now
            _signal_all([*workers, child.pid], signal.SIGKILL)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while True:
            try:
                code = child.wait()
                break
            except InterruptedError:
                continue
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    reader.join(timeout=10)
    if signals_seen > 1:
        print("pgv25: aborted", file=sys.stderr)
        return 130
    return 2 if errors.errors and code != 0 else code  # 2: the user's mistake, as in a single-process run
