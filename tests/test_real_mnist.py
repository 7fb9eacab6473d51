"""Real MNIST (MNIST_DATA_DIR, the official files): the default command's accuracy, a saved model reading real
digits from image files, and the download check of a login node. One training run serves all of them.
Skipped, with the reason, where the files are not there (CI points MNIST_DATA_DIR at ../shared/data)."""
from __future__ import annotations

import subprocess
import sys

import pytest
from PIL import Image

from helpers import REAL_DATA, ROOT, job_env, run_train, summary

pytestmark = [pytest.mark.realdata,
              pytest.mark.skipif(not REAL_DATA, reason="MNIST_DATA_DIR is not set (CI sets it to ../shared/data)")]


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """The default command (2 ranks under torchrun, 4 epochs) on the real, verified files."""
    run = tmp_path_factory.mktemp("real") / "run"
    res = run_train(2, REAL_DATA, run, "--verify-data", timeout=300)
    assert res.returncode == 0, res.stderr
    return run


def test_default_run_reaches_97_percent_on_real_mnist(default_run):
    s = summary(default_run)
    assert s["test_images"] == 10000 and s["world_size"] == 2
    assert s["test_acc"] >= 0.97, s


def test_predict_reads_real_test_digits_from_png(default_run, tmp_path):
    """Real test-set digits as PNG files, as they are and as dark ink on white paper at another size."""
    from torchvision.datasets import MNIST

    ds = MNIST(REAL_DATA, train=False)
    paths, labels = [], []
    for i in range(20):
        img, label = ds[i]
        plain = tmp_path / f"digit{i}.png"
        img.save(plain)
        paper = tmp_path / f"paper{i}.jpg"
        Image.eval(img, lambda v: 255 - v).resize((84, 84)).convert("RGB").save(paper)
        paths += [str(plain), str(paper)]
        labels += [label, label]
    res = subprocess.run([sys.executable, "-m", "mnist_dist.cli", "predict", "--checkpoint",
                          str(default_run / "checkpoints" / "best.pt"), *paths],
                         cwd=ROOT, env=job_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    rows = [line.split("\t") for line in res.stdout.splitlines()]
    assert [r[0] for r in rows] == paths
    got = [int(r[1]) for r in rows]
    assert all(0.0 <= float(r[2]) <= 1.0 for r in rows)
    plain_right = sum(g == y for g, y in zip(got[0::2], labels[0::2], strict=True))
    paper_right = sum(g == y for g, y in zip(got[1::2], labels[1::2], strict=True))
    assert plain_right >= 19, (got, labels)
    assert paper_right >= 17, (got, labels)


def test_download_command_verifies_present_files():
    """On a login node: `mnist-dist download` checks what is there and fetches nothing."""
    res = subprocess.run([sys.executable, "-m", "mnist_dist.cli", "download", "--data-dir", REAL_DATA], cwd=ROOT,
                         env=job_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "present and verified" in res.stdout
