"""`mnist-dist report`: the pictures a person looks at."""
from __future__ import annotations

import subprocess
import sys

from PIL import Image

from conftest import ROOT, job_env, run_train


def test_report_writes_three_pngs_of_sensible_size(tiny_data, tmp_path):
    run = tmp_path / "run"
    assert run_train(1, tiny_data, run, "--epochs", "2", "--log-every", "4").returncode == 0
    for extra in ([], ["--mistakes", "--out", str(tmp_path / "m")]):
        res = subprocess.run([sys.executable, "-m", "mnist_dist.cli", "report", str(run), "--data-dir", str(tiny_data),
                              "--no-verify-data", *extra], cwd=ROOT, env=job_env(), capture_output=True, text=True,
                             timeout=120)
        assert res.returncode == 0, res.stderr
        paths = res.stdout.split()
        assert [p.rsplit("/", 1)[1] for p in paths] == ["predictions.png", "confusion_matrix.png", "curves.png"]
        for path in paths:
            with Image.open(path) as img:
                img.verify()
            with Image.open(path) as img:
                assert img.format == "PNG" and img.width >= 400 and img.height >= 150
                low, high = img.convert("L").getextrema()
                assert high - low > 100, "the picture is not blank"


def test_report_without_checkpoint_is_one_line(tmp_path):
    res = subprocess.run([sys.executable, "-m", "mnist_dist.cli", "report", str(tmp_path)], cwd=ROOT, env=job_env(),
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "no checkpoint" in res.stderr
