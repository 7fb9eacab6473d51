"""W&B mirror of metrics.jsonl (rank 0 only). Stub until the W&B issue lands."""
from __future__ import annotations


def start_wandb(cfg, run_dir, run_id):
    return None
