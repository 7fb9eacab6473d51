"""Hyperparameter sweeps: a grid of points, one run dir each, and a report.

    python -m mnist_dist.sweep point --grid "lr=1e-3,3e-3 hidden=64,128" --index 3   # used by slurm/sweep.sbatch
    mnist-dist sweep-report SWEEP_DIR                                                # table + sweep.png
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from dataclasses import fields
from pathlib import Path

from .config import Config, flag
from .errors import UsageError, print_error


def expand(grid: list[str]) -> list[dict]:
    """['lr=1e-3,3e-3', 'hidden=64,128'] -> every combination, values typed like the Config fields."""
    types = {f.name: {"int": int, "float": float, "str": str}.get(f.type) for f in fields(Config)}
    axes = []
    for item in grid:
        key, _, values = item.partition("=")
        name = key.strip().replace("-", "_")
        if not values or types.get(name) is None:
            raise UsageError(f"bad grid entry {item!r}: want NAME=V1,V2 with NAME a numeric or text train flag")
        try:
            axes.append([(name, types[name](v)) for v in values.split(",")])
        except ValueError:
            raise UsageError(f"bad grid entry {item!r}: values must be {types[name].__name__}") from None
    return [dict(combo) for combo in itertools.product(*axes)]


def point_name(point: dict) -> str:
    return ",".join(f"{flag(k)}={v}" for k, v in point.items())


def point_flags(point: dict) -> list[str]:
    return [part for k, v in point.items() for part in (f"--{flag(k)}", str(v))]


def collect(sweep_dir: Path) -> tuple[list[dict], list[str]]:
    """One row per finished run (config + summary), and the settings that vary between runs."""
    rows = []
    for summary_path in sorted(sweep_dir.glob("*/summary.json")):
        cfg = json.loads((summary_path.parent / "config.json").read_text())
        rows.append({**cfg, **json.loads(summary_path.read_text()), "point": summary_path.parent.name})
    names = [f.name for f in fields(Config) if f.name not in ("run_dir", "wandb_name")]
    swept = [n for n in names if len({json.dumps(r.get(n)) for r in rows}) > 1]
    return rows, swept


def table(sweep_dir: str) -> str:
    from . import plots

    folder = Path(sweep_dir)
    rows, swept = collect(folder)
    if not rows:
        raise UsageError(f"no finished runs (*/summary.json) in {folder}")
    lines = [f"{'point':<30} {'test_acc':>9} {'train_s':>8} {'total_s':>8}"]
    for r in sorted(rows, key=lambda r: -r["test_acc"]):
        lines.append(f"{r['point']:<30} {r['test_acc']:>9.4f} {r['train_seconds']:>8.1f} {r['total_seconds']:>8.1f}")
    plots.save(plots.sweep_plot(rows, swept or ["seed"]), folder / "sweep.png")
    lines.append(f"plot: {folder / 'sweep.png'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`mnist-dist sweep-report SWEEP_DIR`."""
    p = argparse.ArgumentParser(prog="mnist-dist sweep-report", description="Table and plot of a sweep's runs.")
    p.add_argument("sweep_dir")
    print(table(p.parse_args(argv).sweep_dir))
    return 0


def point_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m mnist_dist.sweep point")
    p.add_argument("--grid", required=True, help='space-separated NAME=V1,V2 entries')
    p.add_argument("--index", type=int, required=True)
    args = p.parse_args(argv)
    points = expand(args.grid.split())
    if not 0 <= args.index < len(points):
        raise UsageError(f"--index {args.index} is outside the grid's {len(points)} points")
    point = points[args.index]
    print(point_name(point), *point_flags(point))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["point"]:
        try:
            sys.exit(point_main(sys.argv[2:]))
        except UsageError as err:
            print_error(err)
            sys.exit(err.exit_code)
    sys.exit(main())
