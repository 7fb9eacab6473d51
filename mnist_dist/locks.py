"""File locks that die with their holder (flock): the run dir's, and the data dir's during a download.

A lock held with flock is released by the kernel when its process ends, however it ends (kill -9, a
torchrun restart, a Slurm requeue; on NFS when the lost client's lease runs out): no stale lock file
to delete by hand. The file stays; only the lock on it comes and goes. Where the file system offers
no locks, `hold` warns once and the job goes on unprotected.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
from pathlib import Path
from collections.abc import Iterator

from .errors import warn


def hold(path: Path, holder: dict) -> tuple[int | None, dict | None]:
    """Take the lock at `path` without waiting, and write `holder` into it.

    Returns (fd, None) when this process has it: the open fd keeps the lock (close it, or exit, to
    release); (None, other) when another process holds it, `other` being what it wrote there (possibly
    empty); (None, None) on a file system without locks (warned once). OSError when the file cannot be
    created."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None, read_holder(path)
    except OSError as err:  # ENOLCK, EOPNOTSUPP: a file system without locks
        os.close(fd)
        warn(f"cannot lock {path} ({err.strerror}): this file system offers no locks, so nothing stops a "
             f"second job from using the same folder")
        return None, None
    os.ftruncate(fd, 0)
    os.write(fd, (json.dumps(holder) + "\n").encode())
    return fd, None


def read_holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # being written right now, or not ours
        return {}


@contextlib.contextmanager
def waiting(path: Path, message: str) -> Iterator[None]:
    """Hold the lock at `path` for the block, waiting for it if another process has it (and printing
    `message` once then). Without a writable folder or locks, the block runs unlocked."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:  # a read-only data folder: nobody can be writing into it through us
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"mnist-dist: {message}", file=sys.stderr, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass  # no locks here: go on unlocked
        yield
    finally:
        os.close(fd)
