"""Pictures of a run, as pure functions of data -> matplotlib Figure (no pyplot state, nothing leaks).

Used by `mnist-dist report RUN_DIR`, by the W&B mirror process after each evaluation, and by the
notebook. Inputs are array-likes on the CPU (NumPy arrays or CPU tensors): this module does not need torch.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

RIGHT, WRONG = "#1a7f37", "#cf222e"


def prediction_grid(pixels, preds, labels, cols: int = 8, title: str = "predicted / true") -> Figure:
    """Digits in a grid, each captioned 'pred / true'; mistakes in red. pixels: [N, 28, 28] ink in [0, 1]
    (`data.to_pixels` turns the training job's normalised images into these).

    The digits are tiled into one mosaic (one Axes), which renders far faster than a subplot each.
    """
    pixels = np.asarray(pixels, dtype=np.float32).reshape(-1, 28, 28)
    n = len(pixels)
    rows = max(1, -(-n // cols))
    cell = 28 + 12  # pixels: the digit plus room for its caption below
    mosaic = np.ones((rows * cell, cols * (28 + 4)), dtype=np.float32)
    fig = Figure(figsize=(cols * 0.9, rows * 1.1 + 0.5))  # fixed margins: a layout engine doubles the cost
    ax = fig.add_axes((0.01, 0.01, 0.98, 1 - 0.45 / (rows * 1.1 + 0.5)))
    for i in range(n):
        r, c = divmod(i, cols)
        mosaic[r * cell:r * cell + 28, c * 32 + 2:c * 32 + 30] = 1 - pixels[i]  # dark ink on white
        ax.text(c * 32 + 16, r * cell + 34, "", ha="center", va="center", fontsize=9, fontweight="bold")
    ax.imshow(mosaic, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    if n == 0:
        ax.text(cols * 16, cell / 2, "no images to show (no mistakes?)", ha="center", va="center")
    ax.set_axis_off()
    return recaption_grid(fig, preds, labels, title)


def recaption_grid(fig: Figure, preds, labels, title: str = "predicted / true") -> Figure:
    """New predictions for the same digits: rewrites the captions of a `prediction_grid` figure in place
    (the W&B mirror redraws one grid after every evaluation, cheaper than building it anew)."""
    ax = fig.axes[0]
    # strict=False: an empty grid has one text ("no images to show") and no predictions
    for text, p, t in zip(ax.texts, preds, labels, strict=False):
        text.set_text(f"{int(p)} / {int(t)}")
        text.set_color(RIGHT if p == t else WRONG)
    ax.set_title(f"{title}   (red: wrong)", fontsize=10)
    return fig


def confusion_matrix(counts, title: str = "confusion matrix") -> Figure:
    """10x10 counts, shaded by each row's share (recall), with the counts written in the cells."""
    fig = Figure(figsize=(6.4, 5.6))  # fixed margins: a layout engine doubles the cost
    fig.subplots_adjust(left=0.1, right=0.97, bottom=0.09, top=0.93)
    ax = fig.subplots()
    im = ax.imshow(np.zeros((10, 10)), cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, label="share of the true digit's images")
    for t in range(10):
        for p in range(10):
            ax.text(p, t, "", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(10))
    ax.set_yticks(range(10))
    ax.set_xlabel("predicted digit")
    ax.set_ylabel("true digit")
    return refill_confusion_matrix(fig, counts, title)


def refill_confusion_matrix(fig: Figure, counts, title: str = "confusion matrix") -> Figure:
    """New counts into a `confusion_matrix` figure, in place (cheaper than building it anew)."""
    counts = np.asarray(counts, dtype=np.int64)
    share = counts / counts.sum(1, keepdims=True).clip(min=1)
    ax = fig.axes[0]
    ax.images[0].set_data(share)
    for text, count, shade in zip(ax.texts, counts.flat, share.flat, strict=True):  # row-major, as created
        text.set_text(str(count) if count else "")
        text.set_color("white" if shade > 0.5 else "black")
    acc = np.trace(counts) / max(counts.sum(), 1)
    ax.set_title(f"{title} (accuracy {acc:.2%})")
    return fig


def curves(history: list[dict]) -> Figure:
    """Train loss against step, and test accuracy against step (one point per epoch)."""
    steps = [(r["step"], r["train_loss"]) for r in history if "train_loss" in r]
    evals = [(r["step"], r["test_acc"], r["epoch"]) for r in history if "test_acc" in r]
    fig = Figure(figsize=(10, 3.8), layout="constrained")
    left, right = fig.subplots(1, 2)
    if steps:
        left.plot(*zip(*steps, strict=True), lw=1)
    left.set_xlabel("step")
    left.set_ylabel("train loss")
    left.set_yscale("log")
    left.set_title("training loss")
    if evals:
        x, acc, epochs = zip(*evals, strict=True)
        right.plot(x, [a * 100 for a in acc], marker="o")
        for xi, a, e in evals:
            right.annotate(
                f"epoch {e}", (xi, a * 100), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8
            )
    right.set_xlabel("step")
    right.set_ylabel("test accuracy (%)")
    right.set_title("test accuracy after each epoch")
    return fig


def rank_times(history: list[dict], many: int = 16) -> Figure:
    """Each rank's compute and wait per step (ms) against the step, from metrics.jsonl's interval records;
    past `many` ranks, the min, median and max over the ranks. A straggler computes long and waits little."""
    rows = [r for r in history if "rank_compute_s" in r and r.get("interval_steps")]
    fig = Figure(figsize=(10, 3.8), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    for ax, key, title in zip(axes, ("rank_compute_s", "rank_wait_s"), ("compute", "wait in the exchange"),
                              strict=True):
        if rows:
            steps = [r["step"] for r in rows]
            per_step = [[1000 * v / r["interval_steps"] for v in r[key]] for r in rows]  # [interval][rank]
            ranks = list(zip(*per_step, strict=True))
            if len(ranks) <= many:
                for rank, values in enumerate(ranks):
                    ax.plot(steps, values, lw=1, label=f"rank {rank}")
            else:
                ax.fill_between(steps, [min(v) for v in per_step], [max(v) for v in per_step], alpha=0.3,
                                label="min to max")
                ax.plot(steps, [sorted(v)[len(v) // 2] for v in per_step], lw=1, label="median")
        ax.set_xlabel("step")
        ax.set_title(f"{title} per step, each rank")
    axes[0].set_ylabel("ms per step")
    if rows:
        axes[1].legend(fontsize=7, loc="upper right")
    return fig


def sweep_plot(rows: list[dict], keys: list[str]) -> Figure:
    """Test accuracy against each swept value (one panel per swept setting)."""
    fig = Figure(figsize=(4.2 * max(len(keys), 1), 3.6), layout="constrained")
    axes = fig.subplots(1, max(len(keys), 1), squeeze=False)[0]
    for ax, key in zip(axes, keys, strict=False):  # one empty panel when there are no keys
        values = sorted({r[key] for r in rows})
        positions = {v: i for i, v in enumerate(values)}
        ax.scatter([positions[r[key]] for r in rows], [r["test_acc"] * 100 for r in rows])
        ax.set_xticks(range(len(values)), [str(v) for v in values])
        ax.set_xlabel(key)
        ax.set_ylabel("test accuracy (%)")
    return fig


def save(fig: Figure, path: str | Path, dpi: int = 110) -> Path:
    path = Path(path)
    fig.savefig(path, dpi=dpi)
    return path


def to_image(fig: Figure, dpi: int = 90):
    """The figure as a PIL image, rendered by Agg without a PNG round trip (W&B encodes it once)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from PIL import Image

    fig.set_dpi(dpi)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return Image.frombuffer("RGBA", canvas.get_width_height(), canvas.buffer_rgba(), "raw", "RGBA", 0, 1).convert("RGB")
