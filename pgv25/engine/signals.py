"""Preemption and Ctrl-C: finish the step, checkpoint, exit cleanly; a second Ctrl-C aborts.

A repeated SIGTERM is ignored rather than treated as "abort": schedulers such as SLURM signal every
process of a job, so a worker under torchrun receives one SIGTERM from the scheduler and another
forwarded by torchrun, and must still finish its checkpoint.

The handler only sets a flag; the runner reads it after each step and OR-s it over all ranks, so
every process stops after the same iteration even when the signal reached them at different times.
"""

from __future__ import annotations

import logging
import signal
import threading

logger = logging.getLogger("pgv25")

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class GracefulStop:
    """Context manager: while active, the first SIGINT/SIGTERM requests a stop; a SIGINT after that aborts."""

    def __init__(self):
        self.received: str | None = None
        self._previous: dict = {}

    @property
    def requested(self) -> bool:
        return self.received is not None

    def _handle(self, signum, frame):
        if self.received is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt  # the user insists: abort now, without a checkpoint
            return  # another SIGTERM for the same stop
        self.received = signal.Signals(signum).name
        logger.warning("%s received: finishing this iteration, then writing a checkpoint (Ctrl-C again to abort)", self.received)

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():  # signal handlers live on the main thread
            self._previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
