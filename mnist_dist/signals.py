"""Stop requests from the cluster: SIGTERM, SIGUSR1 and SIGUSR2 only set a flag.

The training loop reads the flag at its sync points and all ranks agree on it through the same small
all_reduce that carries the loss (no collective ever runs inside a signal handler). The run then
checkpoints and exits with EXIT_PREEMPTED (errors.py); starting it again resumes.
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
    return (
        tuple(signal.Signals[f"SIG{n.strip().upper().removeprefix('SIG')}"] for n in names.split(",") if n.strip())
        or STOP_SIGNALS
    )


class StopFlag:
    """Remembers the first stop signal received; restores the previous handlers on exit."""

    def __init__(self) -> None:
        self.signum = 0
        self.previous: dict[int, object] = {}

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():  # handlers only install there
            for sig in stop_signals():
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: object) -> None:
        self.signum = self.signum or signum  # just a flag: no I/O, no collectives in a handler

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
