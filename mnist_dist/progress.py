"""This rank's progress, counted where work gets done and read by the hang watchdog (watchdog.py).

Training steps, evaluation batches and each MiB of a checkpoint written count one unit: a slow but live
phase (a long evaluation, a large checkpoint on a slow disk) keeps counting, and only a rank that
stopped moving looks hung. A plain module-level counter: cheap enough for every step, and the
watchdog's threads only read it.
"""
from __future__ import annotations

units = 0  # how much this rank has done so far
step = 0   # the newest training step it finished


def made(at_step: int | None = None) -> None:
    """Count one unit of progress; a training step also says which step it was."""
    global units, step
    units += 1
    if at_step is not None:
        step = at_step
