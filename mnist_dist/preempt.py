"""Stop requests from the cluster: SIGTERM, SIGUSR1 and SIGUSR2 only set a flag.

The training loop reads the flag at step boundaries and all ranks agree on it through the same small
all_reduce that carries the loss (no collective ever runs inside a signal handler). The run then
checkpoints and exits with EXIT_PREEMPTED; starting it again resumes.
"""
from __future__ import annotations

import os
import signal
import threading

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


def stop_signals() -> tuple[signal.Signals, ...]:
    """The signals that stop training; a launcher may narrow them with MNIST_STOP_SIGNALS=USR2,...
    (submitit does: it keeps SIGTERM for itself and preempts with USR2)."""
    names = os.environ.get("MNIST_STOP_SIGNALS", "")
    return tuple(signal.Signals[f"SIG{n.strip().upper().removeprefix('SIG')}"] for n in names.split(",") if n.strip()) or STOP_SIGNALS

EXIT_OK = 0
EXIT_ERROR = 1        # an unexpected failure (traceback printed)
EXIT_USAGE = 2        # bad flag, missing/corrupt data or checkpoint: one line on stderr
EXIT_DIVERGED = 3     # the loss became NaN or infinite; the last good checkpoint is kept
EXIT_WRITE_FAILED = 74  # a file of the run could not be written (EX_IOERR): disk full, quota, I/O error
EXIT_PREEMPTED = 75   # stopped by a signal after a checkpoint (EX_TEMPFAIL): run again to resume
EXIT_HUNG = 76        # some rank made no progress for --hang-timeout seconds: run again to resume


class StopFlag:
    """Remembers the first stop signal received; restores the previous handlers on exit."""

    def __init__(self) -> None:
        self.signum = 0
        self.previous: dict[int, object] = {}

    def __enter__(self) -> "StopFlag":
        if threading.current_thread() is threading.main_thread():  # handlers only install there
            for sig in stop_signals():
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: object) -> None:
        self.signum = self.signum or signum  # just a flag: no I/O, no collectives in a handler

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class Preempted(Exception):
    """Raised by the training loop after it saved a checkpoint because of a stop signal."""

    exit_code = EXIT_PREEMPTED

    def __init__(self, signum: int, step: int, checkpoint: str):
        by = signal.Signals(signum).name if signum else "a signal to another rank"
        super().__init__(f"stopped by {by} at step {step}; checkpoint {checkpoint}; run the same command again to resume")
        self.signum, self.step, self.checkpoint = signum, step, checkpoint


class Diverged(Exception):
    exit_code = EXIT_DIVERGED
