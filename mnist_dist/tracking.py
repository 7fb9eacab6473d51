"""Run outputs on rank 0: config.json, metrics.jsonl (the source of truth), summary.json, and the W&B
mirror (a child process, see wandb_mirror.py). Other ranks get a NullTracker, so the training loop has
no rank checks.
"""
from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import torch

from .checkpoint import WriteFailed, atomic_write_text
from .config import Config
from .data import to_pixels
from .wandb_mirror import MirrorProcess, new_run_id, resolve_mode

GRID_IMAGES = 40  # test images in the W&B prediction grid


def say(*parts: Any) -> None:
    """Print on rank 0 (the tracker is the only caller that prints progress)."""
    print(*parts, flush=True)


class NullTracker:
    """What ranks other than 0 get: every call does nothing."""

    wandb_run_id: str | None = None

    def start(self, cfg: Config, history: list[dict], wandb_run_id: str | None) -> None: ...
    def log(self, record: dict) -> None: ...
    def say(self, *parts: Any) -> None: ...
    def figures(self, step: int, figures: dict) -> None: ...
    def finish(self, summary: dict | None, best_checkpoint: Path | None = None) -> None: ...


class Tracker(NullTracker):
    def __init__(self, cfg: Config):
        self.run_dir = Path(cfg.run_dir)
        self.history: list[dict] = []
        self.metrics = None
        self.wandb_mode = resolve_mode(cfg.wandb)
        # started now, so that it imports wandb while this process imports the rest and loads the data
        self.mirror = MirrorProcess() if self.wandb_mode != "disabled" else None

    def start(self, cfg: Config, history: list[dict], wandb_run_id: str | None) -> None:
        """Write config.json, rewrite metrics.jsonl as of the checkpoint we resume from, start W&B."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.run_dir / "config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
        self.history = list(history)
        atomic_write_text(self.run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))
        try:
            self.metrics = open(self.run_dir / "metrics.jsonl", "a", buffering=1)
        except OSError as err:
            raise WriteFailed(self.run_dir / "metrics.jsonl", err) from None
        if self.mirror:
            self.wandb_run_id = wandb_run_id or new_run_id()
            self.mirror.send("init", {"config": cfg.to_dict(), "run_dir": str(self.run_dir),
                                      "run_id": self.wandb_run_id, "mode": self.wandb_mode})

    def log(self, record: dict) -> None:
        self.history.append(record)
        try:
            self.metrics.write(json.dumps(record) + "\n")  # a line at a time: flushed here
        except OSError as err:
            raise WriteFailed(self.run_dir / "metrics.jsonl", err) from None
        if self.mirror:
            self.mirror.send("log", record)

    def say(self, *parts: Any) -> None:
        say(*parts)

    def figures(self, step: int, figures: dict) -> None:
        """Hand the evaluation to the mirror, which draws the pictures while training goes on."""
        if not self.mirror:
            return
        result, images, labels = figures["eval"], figures["images"], figures["labels"]
        self.mirror.send("figures", {
            "step": step, "confusion": result.confusion.tolist(),
            "predictions": packed(result.predictions), "labels": packed(labels),
            "pixels": packed(to_pixels(images[:GRID_IMAGES]).mul_(255).round_()),
        })

    def finish(self, summary: dict | None, best_checkpoint: Path | None = None) -> None:
        try:
            if summary is not None:
                atomic_write_text(self.run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        finally:  # whatever happened to the summary, metrics.jsonl is closed and W&B finishes
            if self.metrics:
                try:
                    self.metrics.close()
                except OSError:
                    pass  # the failed write was reported where it happened
            if self.mirror:
                self.mirror.close({"summary": summary, "best_checkpoint": str(best_checkpoint) if best_checkpoint else None})


def packed(values: torch.Tensor) -> str:
    """Small non-negative integers (digits, 8-bit pixels) as text for the pipe: one byte each."""
    return base64.b64encode(values.to(device="cpu", dtype=torch.uint8).numpy().tobytes()).decode()


def make_tracker(is_main: bool, cfg: Config) -> NullTracker:
    return Tracker(cfg) if is_main else NullTracker()
