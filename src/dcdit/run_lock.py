"""One training process per run folder: ``<run>/train.lock``, held by rank 0 while `dcdit train` runs.

Two processes training one folder would both resume from its latest checkpoint and write the same
checkpoints and ``log.csv``; a resume drops the log's rows after its checkpoint, so the first
process's later rows are lost. (It happened: on 2026-12-01 the MNIST study started two more
processes on a run that was still training; the log lost rows 1,550–1,650 and the CPU went to three
copies of one run.) The lock file is created exclusively and holds ``host pid``. A lock of a process
that is gone from this host is taken over (a killed run leaves its lock behind); a lock from another
host (a shared file system) is respected: the message names the file to delete if no process owns it.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from .errors import DcditError

LOCK_NAME = "train.lock"


class RunLocked(DcditError):
    """Another live process is training this run folder."""


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (someone else's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _owner(lock: Path) -> tuple[str, int] | None:
    """(host, pid) written in the lock; None while it is being written or just removed."""
    try:
        host, pid = lock.read_text().split()
        return host, int(pid)
    except (OSError, ValueError):
        return None


def acquire(run_dir: Path) -> Path:
    """Take ``run_dir``'s lock or raise :class:`RunLocked` naming its owner."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / LOCK_NAME
    for _ in range(3):  # a stale lock is removed and the exclusive create tried again
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            owner = _owner(lock)
            if owner is None or owner[0] != socket.gethostname() or pid_alive(owner[1]):
                who = "a process starting up" if owner is None else f"process {owner[1]} on {owner[0]}"
                raise RunLocked(f"{run_dir} is being trained by {who} ({lock}): wait for it to finish or stop it; "
                                f"if no process is training it, delete {lock}") from None
            lock.unlink(missing_ok=True)  # its process is gone
            continue
        with os.fdopen(fd, "w") as f:
            f.write(f"{socket.gethostname()} {os.getpid()}")
        return lock
    raise RunLocked(f"could not take {lock}: other processes keep creating it; stop them and retry")


def release(lock: Path) -> None:
    """Remove the lock if this process still owns it."""
    if _owner(lock) == (socket.gethostname(), os.getpid()):
        lock.unlink(missing_ok=True)


@contextlib.contextmanager
def run_lock(run_dir: str | os.PathLike, enabled: bool = True) -> Iterator[None]:
    """Hold ``run_dir``'s lock for the block (``enabled`` False: other ranks, which rank 0 speaks for).
    A folder made only to hold the lock is removed again when nothing else was written into it (a
    config refused before training leaves no folder behind)."""
    run_dir = Path(run_dir)
    made = enabled and not run_dir.exists()
    lock = acquire(run_dir) if enabled else None
    try:
        yield
    finally:
        if lock is not None:
            release(lock)
            if made and not any(run_dir.iterdir()):
                run_dir.rmdir()
