"""Progress within an epoch on rank 0's console (--progress auto|bar|lines|off).

In a terminal, a live tqdm bar (step/steps, samples/s, loss, eta); in a log (Slurm's, a pipe), plain
lines without carriage returns, at most one per 10% of the epoch or per 30 s, whichever comes first,
and never two within `TQDM_MININTERVAL` seconds (default 5 here: a one-second epoch prints only its
epoch line). tqdm's own TQDM_* variables apply to the bar. The loop calls `step` every step: a
comparison, no I/O, until a line is due.
"""
from __future__ import annotations

import os
import sys
import time
from typing import TextIO

LINE_EVERY_S = 30.0
LINE_EVERY_FRACTION = 0.1


class NoDisplay:
    """--progress off, and ranks other than 0."""

    def start_epoch(self, epoch: int, epochs: int, steps: int, done: int, samples_per_step: int) -> None: ...
    def step(self, done: int) -> None: ...
    def note(self, loss: float) -> None: ...
    def end_epoch(self) -> None: ...

    def write(self, line: str, file: TextIO | None = None) -> None:
        print(line, file=file or sys.stdout, flush=True)


class Lines(NoDisplay):
    """Plain lines for logs: `epoch 2/10  step 300/938  32%  1,234 samples/s  loss 0.2311  eta 0:41`."""

    def __init__(self, file: TextIO | None = None):
        self.file = file or sys.stdout
        # tqdm has read it already (torch imports tqdm, which fails on a value it cannot read)
        self.min_gap_s = float(os.environ.get("TQDM_MININTERVAL", 5.0))
        self.loss: float | None = None

    def start_epoch(self, epoch: int, epochs: int, steps: int, done: int, samples_per_step: int) -> None:
        self.title, self.steps, self.first, self.per_step = f"epoch {epoch}/{epochs}", steps, done, samples_per_step
        self.start = self.last = time.perf_counter()
        self.stride = max(1, round(steps * LINE_EVERY_FRACTION))
        self.next_step = done + self.stride
        self.next_check = done + 1

    def step(self, done: int) -> None:
        if done < self.next_check:  # the per-step cost: one comparison
            return
        self.next_check = done + 1
        now = time.perf_counter()
        due = done >= self.next_step or now - self.last >= LINE_EVERY_S
        if not due or now - self.last < self.min_gap_s or done >= self.steps:
            return
        self.last, self.next_step = now, done + self.stride
        rate = (done - self.first) / max(now - self.start, 1e-9)
        eta = (self.steps - done) / max(rate, 1e-9)
        loss = f"  loss {self.loss:.4f}" if self.loss is not None else ""
        print(f"{self.title}  step {done}/{self.steps}  {done / self.steps:.0%}  {rate * self.per_step:,.0f} "
              f"samples/s{loss}  eta {format_eta(eta)}", file=self.file, flush=True)

    def note(self, loss: float) -> None:
        self.loss = loss


class Bar(NoDisplay):
    """A tqdm bar on stderr; other lines are written above it (tqdm.write)."""

    def __init__(self, file: TextIO | None = None):
        from tqdm import tqdm

        self.tqdm, self.file, self.bar, self.per_step = tqdm, file or sys.stderr, None, 1

    def start_epoch(self, epoch: int, epochs: int, steps: int, done: int, samples_per_step: int) -> None:
        # nothing that TQDM_* variables set (mininterval, ncols, ...) is passed here: the user's wins
        self.bar = self.tqdm(total=steps, initial=done, desc=f"epoch {epoch}/{epochs}", unit="step", file=self.file)
        self.done, self.per_step = done, samples_per_step

    def step(self, done: int) -> None:
        if self.bar is not None:
            self.bar.update(done - self.done)
            self.done = done

    def note(self, loss: float) -> None:
        if self.bar is not None:
            rate = self.bar.format_dict.get("rate") or 0.0
            # refresh=False: set_postfix's default redraw on every call would defeat mininterval
            self.bar.set_postfix_str(f"{rate * self.per_step:,.0f} samples/s, loss {loss:.4f}", refresh=False)

    def end_epoch(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def write(self, line: str, file: TextIO | None = None) -> None:
        self.tqdm.write(line, file=file or sys.stdout)


def make_display(mode: str, file: TextIO | None = None) -> NoDisplay:
    """auto: a bar where stderr is a terminal, lines elsewhere."""
    if mode == "auto":
        mode = "bar" if sys.stderr.isatty() else "lines"
    return {"bar": Bar, "lines": Lines}.get(mode, lambda file=None: NoDisplay())(file)


def format_eta(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"
