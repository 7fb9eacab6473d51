"""This rank's progress and what it is doing, counted where work gets done and read by the hang
watchdog (watchdog.py) and its post-mortems (postmortem.py).

Training steps, evaluation batches and each MiB of a checkpoint written count one unit: a slow but live
phase (a long evaluation, a large checkpoint on a slow disk) keeps counting, and only a rank that
stopped moving looks hung. Plain module-level values: cheap enough for every step, and the
watchdog's threads only read them.
"""
from __future__ import annotations

import time

units = 0             # how much this rank has done so far
step = 0              # the newest training step it finished
phase = "start-up"    # what it does now: start-up, data load, training step, sync point, evaluation, checkpoint write
collective = ""       # the last collective it entered
collective_at = 0.0   # when (time.monotonic())


def made(at_step: int | None = None) -> None:
    """Count one unit of progress; a training step also says which step it was."""
    global units, step
    units += 1
    if at_step is not None:
        step = at_step


def enter(new_phase: str) -> None:
    global phase
    phase = new_phase


def entering(name: str) -> None:
    """Note the collective this rank is about to enter (every rank enters the same ones, in order)."""
    global collective, collective_at
    collective, collective_at = name, time.monotonic()
