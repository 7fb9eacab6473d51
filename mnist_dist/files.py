"""Atomic writes: a temporary file beside the target, fsynced, then renamed over it, so that a crash
never leaves a partial file under the target's name. Used for checkpoints and the run's JSON files."""
from __future__ import annotations

import os
from pathlib import Path

from . import progress
from .errors import WriteFailed

CHUNK = 1 << 20  # bytes written between two counts of progress (a slow disk is not a hang)


def atomic_write(path: Path, data: bytes | memoryview) -> None:
    """Write `data` to `path` atomically and durably; WriteFailed (naming `path`) if it cannot be."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            for start in range(0, len(data), CHUNK):  # a full disk fails here with its real reason
                fh.write(data[start:start + CHUNK])
                progress.made()
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as err:
        raise WriteFailed(path, err) from None
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, text.encode())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # makes the rename itself durable
    finally:
        os.close(fd)
