"""`mnist-dist report RUN_DIR`: predictions.png, confusion_matrix.png, curves.png and ranks.png (each rank's
compute and wait per step), from the run dir alone (metrics.jsonl + the newest checkpoint + the test data)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from . import checkpoint, container, data, inference, plots
from .errors import UsageError


def pick_grid(result, labels: torch.Tensor, n: int, mistakes_only: bool) -> torch.Tensor:
    """Indices of the images to show: the first n test images, or the first n mistakes."""
    if mistakes_only:
        return (result.predictions != labels.cpu()).nonzero().flatten()[:n]
    return torch.arange(min(n, len(labels)))


def report(run_dir: str, data_dir: str | None = None, out: str | None = None, n: int = 40,
           mistakes_only: bool = False, verify: bool = True) -> list[Path]:
    run = Path(run_dir)
    container.home_elsewhere(out or run)  # matplotlib's cache where HOME is not usable
    found = checkpoint.newest_valid(checkpoint.checkpoint_dir(run))
    if found is None:
        raise UsageError(f"no checkpoint in {checkpoint.checkpoint_dir(run)}: train first")
    _, _, images, labels, result = inference.evaluate_checkpoint(str(found[1]), data_dir, verify)
    metrics = run / "metrics.jsonl"
    history = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    out_dir = Path(out) if out else run
    out_dir.mkdir(parents=True, exist_ok=True)
    idx = pick_grid(result, labels, n, mistakes_only)
    title = f"{'mistakes: ' if mistakes_only else ''}predicted / true, step {found[0]['step']}"
    written = [
        plots.save(
            plots.prediction_grid(data.to_pixels(images[idx]), result.predictions[idx], labels[idx], title=title),
            out_dir / "predictions.png",
        ),
        plots.save(plots.confusion_matrix(result.confusion), out_dir / "confusion_matrix.png"),
        plots.save(plots.curves(history), out_dir / "curves.png"),
    ]
    if any("rank_compute_s" in r for r in history):  # per-rank timing was on
        written.append(plots.save(plots.rank_times(history), out_dir / "ranks.png"))
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mnist-dist report", description=__doc__)
    p.add_argument("run_dir")
    p.add_argument("--data-dir", help="MNIST root (default: $MNIST_DATA_DIR or the run's own)")
    p.add_argument("--out", help="folder for the PNGs (default: the run dir)")
    p.add_argument("--n", type=int, default=40, help="digits in the grid")
    p.add_argument("--mistakes", action="store_true", help="show only misclassified digits")
    p.add_argument("--no-verify-data", dest="verify", action="store_false")
    args = p.parse_args(argv)
    for path in report(args.run_dir, args.data_dir, args.out, args.n, args.mistakes, args.verify):
        print(path)
    return 0
