"""`mnist-dist report`: the pictures a person looks at."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from helpers import ROOT, job_env, run_train
from mnist_dist import plots


def test_report_writes_three_pngs_of_sensible_size(tiny_data, tmp_path):
    run = tmp_path / "run"
    assert run_train(1, tiny_data, run, "--epochs", "2", "--log-every", "4").returncode == 0
    for extra in ([], ["--mistakes", "--out", str(tmp_path / "m")]):
        res = subprocess.run([sys.executable, "-m", "mnist_dist.cli", "report", str(run), "--data-dir", str(tiny_data),
                              "--no-verify-data", *extra], cwd=ROOT, env=job_env(), capture_output=True, text=True,
                             timeout=120)
        assert res.returncode == 0, res.stderr
        paths = res.stdout.split()
        assert [p.rsplit("/", 1)[1] for p in paths] == ["predictions.png", "confusion_matrix.png", "curves.png",
                                                        "ranks.png"]
        for path in paths:
            with Image.open(path) as img:
                img.verify()
            with Image.open(path) as img:
                assert img.format == "PNG" and img.width >= 400 and img.height >= 150
                low, high = img.convert("L").getextrema()
                assert high - low > 100, "the picture is not blank"


@pytest.mark.parametrize("size", [3, 20])
def test_the_per_rank_picture_shows_the_slow_rank(size):
    """ranks.png: compute and wait per step of every rank (past 16 ranks: min, median and max); a rank
    that computes three times as long stands out in both panels."""
    history = [{"step": 0, "hosts": ["a"] * size}]
    for step in range(50, 1001, 50):
        slow = step > 500
        history.append({"step": step, "interval_steps": 50,
                        "rank_compute_s": [0.05 * (3 if slow and r == 1 else 1) for r in range(size)],
                        "rank_wait_s": [0.01 if slow and r == 1 else (0.11 if slow else 0.01) for r in range(size)]})
    fig = plots.rank_times(history)
    left, right = fig.axes
    assert left.get_ylabel() == "ms per step" and left.get_xlabel() == right.get_xlabel() == "step"
    def highest(ax) -> float:  # over the lines and the min-to-max band
        return max([max(line.get_ydata()) for line in ax.lines] +
                   [c.get_paths()[0].vertices[:, 1].max() for c in ax.collections])
    assert highest(left) == pytest.approx(3.0), "compute: 3 ms per step at its slowest"
    assert highest(right) == pytest.approx(2.2), "the others wait 2.2 ms per step"
    assert len(left.lines) == (size if size <= 16 else 1)
    low, high = np.asarray(plots.to_image(fig).convert("L")).min(), 255
    assert high - low > 100, "the picture is not blank"


def test_report_without_checkpoint_is_one_line(tmp_path):
    res = subprocess.run([sys.executable, "-m", "mnist_dist.cli", "report", str(tmp_path)], cwd=ROOT, env=job_env(),
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "no checkpoint" in res.stderr


def test_refilled_figures_draw_exactly_what_new_ones_do():
    """The W&B mirror refills one grid and one confusion matrix after every evaluation instead of building
    them anew: the pictures must be the same, pixel for pixel, including cells that appear or vanish."""
    rng = np.random.default_rng(0)
    before, after = rng.integers(0, 60, (2, 10, 10))
    before[3, 4], after[3, 4], after[5, 6] = 0, 7, 0
    pixels, labels = rng.random((12, 28, 28)), rng.integers(0, 10, 12)
    guess_1, guess_2 = rng.integers(0, 10, 12), labels.copy()
    pairs = [
        (
            plots.refill_confusion_matrix(plots.confusion_matrix(before), after, "cm"),
            plots.confusion_matrix(after, "cm"),
        ),
        (
            plots.recaption_grid(plots.prediction_grid(pixels, guess_1, labels), guess_2, labels, "later"),
            plots.prediction_grid(pixels, guess_2, labels, title="later"),
        ),
    ]
    for refilled, fresh in pairs:
        assert np.array_equal(np.asarray(plots.to_image(refilled)), np.asarray(plots.to_image(fresh)))
