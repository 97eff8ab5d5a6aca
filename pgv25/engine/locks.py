"""One writer per folder: an OS lock (`flock`) that dies with its process.

Two `pgv25 train` runs on one work dir (the same command started twice, a scheduler requeueing a job
whose first copy still runs) would write, rotate and delete each other's checkpoints; two runs building
the same shared cache would write into each other's temporary folders. The kernel releases a `flock`
when its holder exits in any way, kill -9 included, so a lock is never left behind; the lock file keeps
the holder's PID and host only to say who holds it.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
from pathlib import Path

from ..errors import UserError

logger = logging.getLogger("pgv25")


class FolderLock:
    def __init__(self, path: Path):
        self.path = path
        self._file = None

    def holder(self) -> str:
        try:
            return self.path.read_text().strip() or "another process"
        except OSError:
            return "another process"

    def acquire(self, wait: bool = False) -> bool:
        """Take the lock; False (without waiting) when another process holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            handle.close()
            return False
        handle.seek(0)
        handle.truncate()
        handle.write(f"PID {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        self._file = handle
        return True

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the descriptor releases the flock
            self._file = None


_held: dict[Path, list] = {}  # work dir → [lock, users]: a process may build several Trainers on one work dir


class WorkDirLock:
    """A use of the work dir's lock by one Trainer; the flock is released when the last use in this process ends."""

    def __init__(self, work_dir: Path):
        self._active = False  # a refused lock (UserError below) is still finalised: __del__ must find this
        self.key = work_dir.resolve()
        entry = _held.get(self.key)
        if entry is None:
            lock = FolderLock(work_dir / ".pgv25.lock")
            if not lock.acquire():
                raise UserError(f"work dir {work_dir} is in use by another pgv25 run ({lock.holder()}); wait for it to "
                                "finish, stop it, or choose another --work-dir")
            entry = _held[self.key] = [lock, 0]
        entry[1] += 1
        self._active = True

    def release(self) -> None:
        if not self._active:
            return
        self._active = False
        entry = _held[self.key]
        entry[1] -= 1
        if entry[1] == 0:
            entry[0].release()
            del _held[self.key]

    def __del__(self):
        self.release()


@contextlib.contextmanager
def building(folder: Path, what: str):
    """Hold `folder`'s build lock while it is built, waiting (with a line saying for whom) if another run is building it."""
    lock = FolderLock(folder.parent / f".{folder.name}.lock")
    if not lock.acquire():
        logger.info("waiting for %s to finish building %s (%s)", lock.holder(), what, folder)
        lock.acquire(wait=True)
    try:
        yield
    finally:
        lock.release()
