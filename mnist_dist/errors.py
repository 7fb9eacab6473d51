"""How the job fails and ends: the exit codes, the errors that carry them, and the one line a user sees.

Every error a user can act on is a `JobError`: it knows its exit code and whether every rank raised it
at the same point (decided in a collective) or this rank alone. `train.Job.failures` holds the policy
for both; `main`, `cli` and the submitit callable only map an error to its exit code.
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

# The exit codes (the README's table; slurm/*.sbatch read 75 and 76).
EXIT_OK = 0
EXIT_ERROR = 1          # an unexpected failure (traceback printed)
EXIT_USAGE = 2          # bad flag, missing/corrupt data or checkpoint: one line on stderr
EXIT_DIVERGED = 3       # the loss became NaN or infinite; the last good checkpoint is kept
EXIT_WRITE_FAILED = 74  # a file of the run could not be written (EX_IOERR): disk full, quota, I/O error
EXIT_PREEMPTED = 75     # stopped by a signal after a checkpoint (EX_TEMPFAIL): run again to resume
EXIT_HUNG = 76          # some rank made no progress for --hang-timeout seconds: run again to resume


class JobError(Exception):
    """A failure the job explains in one line and ends with `exit_code`.

    `everywhere`: every rank raised it at the same point (its cause was decided in a collective), so
    rank 0 alone says it; otherwise this rank alone failed and must tell the others."""

    exit_code = EXIT_ERROR
    everywhere = False

    def __init__(self, message: str, *, everywhere: bool | None = None):
        super().__init__(message)
        if everywhere is not None:
            self.everywhere = everywhere


class UsageError(JobError):
    """A problem the user can fix: a bad flag, missing or corrupt data, an unusable checkpoint."""

    exit_code = EXIT_USAGE


class CheckpointError(UsageError):
    """A checkpoint that cannot be used; `unsafe`: it tried to smuggle in code (never skipped)."""

    def __init__(self, message: str, unsafe: bool = False, *, everywhere: bool | None = None):
        super().__init__(message, everywhere=everywhere)
        self.unsafe = unsafe


class WriteFailed(JobError):
    """A file of the run could not be written: disk full, quota, an I/O error, permissions changed.
    Nothing already saved is touched; the temporary file is removed."""

    exit_code = EXIT_WRITE_FAILED

    def __init__(self, path: Path, err: OSError):
        super().__init__(f"cannot write {path}: {err.strerror or err}")


class Diverged(JobError):
    """The loss became NaN or infinite (every rank sees the same all-reduced loss)."""

    exit_code = EXIT_DIVERGED
    everywhere = True


class Preempted(JobError):
    """Raised by the training loop after it saved a checkpoint because of a stop signal."""

    exit_code = EXIT_PREEMPTED
    everywhere = True

    def __init__(self, signum: int, step: int, checkpoint: str):
        by = signal.Signals(signum).name if signum else "a signal to another rank"
        super().__init__(
            f"stopped by {by} at step {step}; checkpoint {checkpoint}; run the same command again to resume"
        )
        self.signum = signum


class StartFailed(JobError):
    """The process group could not form: a peer unreachable or refusing, an address no other host can reach."""


class PeerStopped(JobError):
    """This rank stops because another rank failed or vanished; its exit code is the failed rank's."""

    def __init__(self, message: str, exit_code: int = EXIT_ERROR):
        super().__init__(message)
        self.exit_code = exit_code


def first_line(err: BaseException, limit: int = 300) -> str:
    """The first line of an error's message (its class name if it has none), at most `limit` characters."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:limit]


def print_error(err: object) -> None:
    """The one line a user sees for a problem that ends the job."""
    print(f"mnist-dist: error: {err}", file=sys.stderr, flush=True)


def warn(message: str) -> None:
    """The one line a user sees for a problem the job works around."""
    print(f"mnist-dist: warning: {message}", file=sys.stderr, flush=True)


def say(err: JobError) -> None:
    """Print `err` as the user sees it: a stop after a checkpoint is news, not an error."""
    if isinstance(err, Preempted):
        print(f"mnist-dist: {err}", file=sys.stderr, flush=True)
    else:
        print_error(err)


def exit_process(code: int) -> None:
    """End a training process without interpreter finalization. Gloo's worker threads can still hold
    objects that finalization destroys, which aborts the process now and then ("terminate called
    without an active exception", SIGABRT) after a run that succeeded; everything of ours is already
    flushed and closed by now."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
