"""Run outputs on rank 0: config.json, metrics.jsonl (the source of truth), summary.json, and a W&B
mirror. Other ranks get a NullTracker, so the training loop has no rank checks.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from .checkpoint import atomic_write_text
from .config import Config


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
    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.history: list[dict] = []
        self.wandb = None

    def start(self, cfg: Config, history: list[dict], wandb_run_id: str | None) -> None:
        """Write config.json, rewrite metrics.jsonl as of the checkpoint we resume from, start W&B."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.run_dir / "config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
        self.history = list(history)
        atomic_write_text(self.run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))
        self.metrics = open(self.run_dir / "metrics.jsonl", "a", buffering=1)
        from .wandb_mirror import start_wandb  # wandb itself is imported only when a run uses it

        self.wandb = start_wandb(cfg, self.run_dir, wandb_run_id)
        self.wandb_run_id = self.wandb.run_id if self.wandb else None

    def log(self, record: dict) -> None:
        self.history.append(record)
        self.metrics.write(json.dumps(record) + "\n")
        if self.wandb:
            self.wandb.log(record)

    def say(self, *parts: Any) -> None:
        say(*parts)

    def figures(self, step: int, figures: dict) -> None:
        if self.wandb:
            self.wandb.figures(step, figures)

    def finish(self, summary: dict | None, best_checkpoint: Path | None = None) -> None:
        if summary is not None:
            atomic_write_text(self.run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        if getattr(self, "metrics", None):
            self.metrics.close()
        if self.wandb:
            self.wandb.finish(summary, best_checkpoint)


def make_tracker(is_main: bool, run_dir: str) -> NullTracker:
    return Tracker(run_dir) if is_main else NullTracker()


def warn(message: str) -> None:
    print(f"mnist-dist: warning: {message}", file=sys.stderr, flush=True)
