"""Run outputs on rank 0: config.json, metrics.jsonl (the source of truth), summary.json, and the W&B
mirror (a child process, see wandb_mirror.py). Other ranks get a NullTracker, so the training loop has
no rank checks.
"""
from __future__ import annotations

import base64
import contextlib
import json
import sys
from pathlib import Path
from typing import Any

import torch

from . import container
from .config import Config
from .data import to_pixels
from .errors import WriteFailed
from .files import atomic_write_text
from .progress_display import make_display
from .wandb_mirror import MirrorProcess, new_run_id, resolve_mode

GRID_IMAGES = 40  # test images in the W&B prediction grid


class NullTracker:
    """What ranks other than 0 get: every call does nothing."""

    def __enter__(self) -> NullTracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self, cfg: Config, history: list[dict], wandb_run_id: str | None) -> str | None:
        return wandb_run_id

    def log(self, record: dict) -> None: ...
    def say(self, *parts: Any) -> None: ...
    def event(self, record: dict, line: str, level: str) -> None: ...
    def start_epoch(self, epoch: int, epochs: int, steps: int, done: int, samples_per_step: int) -> None: ...
    def stepped(self, done: int) -> None: ...
    def end_epoch(self) -> None: ...
    def figures(self, step: int, result, test: tuple | None) -> None: ...
    def write_summary(self, summary: dict) -> None: ...
    def close(self) -> None: ...


class Tracker(NullTracker):
    def __init__(self, cfg: Config):
        self.run_dir = Path(cfg.run_dir)
        self.history: list[dict] = []
        self.metrics = None
        self.summary: dict | None = None
        # W&B's and matplotlib's folders under the run dir where HOME is not usable (containers); before
        # the mirror starts: it inherits them
        container.home_elsewhere(cfg.run_dir)
        self.wandb_mode = resolve_mode(cfg.wandb)
        self.display = make_display(cfg.progress)  # progress within an epoch
        # started now, so that it imports wandb while this process imports the rest and loads the data
        self.mirror = MirrorProcess() if self.wandb_mode != "disabled" else None

    def start(self, cfg: Config, history: list[dict], wandb_run_id: str | None) -> str | None:
        """Write config.json, rewrite metrics.jsonl as of the checkpoint we resume from (`history`, the
        training state's list, which `log` appends to), start W&B; returns the W&B run id."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.run_dir / "config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
        self.history = history
        atomic_write_text(self.run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))
        self.append("")  # opens it for the records to come
        if not self.mirror:
            return wandb_run_id
        wandb_run_id = wandb_run_id or new_run_id()
        self.mirror.send("init", {"config": cfg.to_dict(), "run_dir": str(self.run_dir), "run_id": wandb_run_id,
                                  "mode": self.wandb_mode})
        return wandb_run_id

    def log(self, record: dict) -> None:
        self.history.append(record)
        self.append(json.dumps(record) + "\n")
        if self.mirror:
            self.mirror.send("log", record)
        if "train_loss" in record:
            self.display.note(record["train_loss"])

    def event(self, record: dict, line: str, level: str) -> None:
        """A diagnosis (slowdown.py): a record, one line on stderr, and a W&B alert when online."""
        self.log(record)
        self.display.write(f"mnist-dist: {level}: {line}", file=sys.stderr)
        if self.mirror:
            self.mirror.send("alert", {"title": record["event"].replace("_", " "), "text": line, "level": level})

    def start_epoch(self, epoch: int, epochs: int, steps: int, done: int, samples_per_step: int) -> None:
        self.display.start_epoch(epoch, epochs, steps, done, samples_per_step)

    def stepped(self, done: int) -> None:
        self.display.step(done)

    def end_epoch(self) -> None:
        self.display.end_epoch()

    def append(self, text: str) -> None:
        """Add to metrics.jsonl, a line at a time (flushed here)."""
        try:
            # held open for the whole run (closed in close()): one open per line would cost a syscall pair each
            self.metrics = self.metrics or open(self.run_dir / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115
            self.metrics.write(text)
        except OSError as err:
            raise WriteFailed(self.run_dir / "metrics.jsonl", err) from None

    def say(self, *parts: Any) -> None:
        self.display.write(" ".join(str(p) for p in parts))

    def figures(self, step: int, result, test: tuple | None) -> None:
        """Hand the evaluation (an evaluate.Evaluation of the test images and labels) to the mirror,
        which draws the pictures while training goes on."""
        if not self.mirror:
            return
        images, labels = test
        self.mirror.send("figures", {
            "step": step, "confusion": result.confusion.tolist(),
            "predictions": as_text(result.predictions), "labels": as_text(labels),
            "pixels": as_text(to_pixels(images[:GRID_IMAGES]).mul_(255).round_()),
        })

    def write_summary(self, summary: dict) -> None:
        atomic_write_text(self.run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        self.summary = summary

    def close(self) -> None:
        """Close the progress bar and metrics.jsonl and let W&B finish (with the summary, if the run got that far)."""
        self.display.end_epoch()
        if self.metrics:
            with contextlib.suppress(OSError):  # a failed write was reported where it happened
                self.metrics.close()
        if self.mirror:
            self.mirror.close(
                {"summary": self.summary, "best_checkpoint": str(self.run_dir / "checkpoints" / "best.pt")}
            )


def as_text(values: torch.Tensor) -> str:
    """Small non-negative integers (digits, 8-bit pixels) as text for the pipe: one byte each."""
    return base64.b64encode(values.to(device="cpu", dtype=torch.uint8).numpy().tobytes()).decode()


def make_tracker(is_main: bool, cfg: Config) -> NullTracker:
    return Tracker(cfg) if is_main else NullTracker()
