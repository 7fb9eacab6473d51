"""The run dir, owned by rank 0: one job at a time, writable, and the checkpoint to resume from.

    RUN_DIR/.lock   locked by rank 0 while a job runs (see locks.py): a second job started on the same
                    run dir is refused at once, naming the holder; the lock dies with its holder
    RUN_DIR/checkpoints/   read by rank 0 alone when resuming; the other ranks get the state from it,
                    so run dirs that differ between nodes (node-local disks) resume alike
"""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from . import checkpoint, locks
from .config import TRAJECTORY_FIELDS, Config, UsageError, flag
from .distributed import DistEnv

LOCK = ".lock"


def claim(cfg: Config, env: DistEnv) -> int | None:
    """Create the run dir, lock it for this job and check it is writable. The lock lives as long as the
    returned fd (see `release`) or this process."""
    run_dir = Path(cfg.run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = locks.hold(run_dir / LOCK, holder(env))
        probe = run_dir / f".write-test{os.getpid()}"
        probe.write_text("")
        probe.unlink()
        return fd
    except locks.Held as held:
        raise UsageError(f"--run-dir {run_dir} is in use by another job ({describe(held.holder)}); wait for it "
                         f"to end, or choose another --run-dir") from None
    except OSError as err:
        raise UsageError(f"cannot write to --run-dir {run_dir}: {err.strerror}") from None


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


def resume_state(cfg: Config) -> dict | None:
    """The checkpoint to resume from, per --resume, checked against this run's config (rank 0)."""
    ckpt_dir = checkpoint.folder(cfg.run_dir)
    if cfg.resume == "never":
        if checkpoint.listed(ckpt_dir) and not cfg.overwrite:
            raise UsageError(f"{ckpt_dir} holds checkpoints: drop --no-resume to resume, pass --overwrite "
                             f"to start over, or choose another --run-dir")
        return None
    if cfg.resume == "auto":
        found = checkpoint.newest_valid(ckpt_dir)
        state = found[0] if found else None
    else:
        state = checkpoint.load(cfg.resume)
    if state is not None:
        differ = [f for f in TRAJECTORY_FIELDS if state["config"].get(f) != getattr(cfg, f)]
        if differ:
            diffs = ", ".join(f"--{flag(f)} {state['config'].get(f)} (saved) vs {getattr(cfg, f)} (now)" for f in differ)
            raise UsageError(f"cannot resume from the checkpoint in {ckpt_dir}: {diffs}; use another --run-dir "
                             f"or --no-resume --overwrite")
    return state
