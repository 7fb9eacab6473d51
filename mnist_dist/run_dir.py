"""The run dir, owned by rank 0: one job at a time, and writable.

    RUN_DIR/.lock   locked by rank 0 while a job runs (see locks.py): a second job started on the same
                    run dir is refused at once, naming the holder; the lock dies with its holder
"""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from . import locks
from .config import Config
from .distributed import DistEnv
from .errors import UsageError

LOCK = ".lock"


def claim(cfg: Config, env: DistEnv) -> int | None:
    """Create the run dir, lock it for this job and check it is writable. The lock lives as long as the
    returned fd (see `release`) or this process."""
    run_dir = Path(cfg.run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd, other = locks.hold(run_dir / LOCK, holder(env))
        probe = run_dir / f".write-test{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise UsageError(f"cannot write to --run-dir {run_dir}: {err.strerror}") from None
    if other is not None:
        raise UsageError(f"--run-dir {run_dir} is in use by another job ({describe(other)}); wait for it "
                         f"to end, or choose another --run-dir")
    return fd


def release(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)


def holder(env: DistEnv) -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "slurm_job": env.job_id or None, "torchrun_restart": env.restart if env.agent_store else None}


def describe(who: dict) -> str:
    if not who:
        return "it is starting up"
    parts = [f"pid {who.get('pid')} on {who.get('host')}"]
    if who.get("slurm_job"):
        parts.append(f"Slurm job {who['slurm_job']}")
    if who.get("torchrun_restart") is not None:
        parts.append(f"torchrun restart round {who['torchrun_restart']}")
    return ", ".join(parts) + f", since {who.get('since')}"
