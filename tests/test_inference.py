"""Saved models in use: evaluate, predict on image files, export weights-only."""
from __future__ import annotations

import subprocess
import sys

import pytest
from PIL import Image

from helpers import ROOT, job_env, run_train, summary


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mnist_dist.cli", *args], cwd=ROOT, env=job_env(),
                          capture_output=True, text=True, timeout=120)


def test_evaluate_prints_the_accuracy_of_the_checkpoint(tiny_data, tmp_path):
    run = tmp_path / "run"
    assert run_train(1, tiny_data, run, "--epochs", "2").returncode == 0
    res = cli("evaluate", "--checkpoint", str(run / "checkpoints" / "best.pt"), "--data-dir", str(tiny_data),
              "--no-verify-data")
    assert res.returncode == 0, res.stderr
    assert f"test_acc {summary(run)['test_acc']:.4f}" in res.stdout and "(200 images, mlp)" in res.stdout


def test_evaluate_and_predict_errors_are_one_line(tmp_path):
    res = cli("evaluate", "--checkpoint", str(tmp_path / "nope.pt"))
    assert res.returncode == 2 and "does not exist" in res.stderr and "Traceback" not in res.stderr
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    res = cli("predict", "--checkpoint", str(junk), str(junk))
    assert res.returncode == 2 and "corrupt" in res.stderr and "Traceback" not in res.stderr


def test_export_writes_weights_loadable_without_the_package(tiny_data, tmp_path):
    run = tmp_path / "run"
    assert run_train(1, tiny_data, run, "--epochs", "1", "--hidden", "32").returncode == 0
    out = tmp_path / "model.safetensors"
    res = cli("export", "--checkpoint", str(run / "checkpoints" / "best.pt"), str(out))
    assert res.returncode == 0, res.stderr
    code = ("from safetensors.torch import load_file; from safetensors import safe_open; import torch\n"
            f"w = load_file({str(out)!r}); m = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 32),"
            " torch.nn.ReLU(), torch.nn.Linear(32, 10)); m.load_state_dict(w)\n"
            f"print(safe_open({str(out)!r}, 'pt').metadata()['hidden'], m(torch.zeros(1, 1, 28, 28)).shape)")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["32", "torch.Size([1,", "10])"]


@pytest.fixture(scope="module")
def tiny_ckpt(tiny_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("tiny") / "run"
    assert run_train(1, tiny_data, run, "--epochs", "1").returncode == 0
    return str(run / "checkpoints" / "best.pt")


def test_bad_images_and_outputs_are_one_line(tiny_ckpt, tmp_path):
    """A decompression bomb, an export into a path under a file: one line, exit 2."""
    huge = tmp_path / "huge.png"
    Image.new("L", (15000, 15000), 0).save(huge)  # 225 Mpx: past PIL's bomb limit (2 x 89 Mpx)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for args, says in ((("predict", "--checkpoint", tiny_ckpt, str(huge)), "cannot read image"),
                       (("export", "--checkpoint", tiny_ckpt, str(blocker / "model.safetensors")), "cannot write")):
        res = cli(*args)
        assert res.returncode == 2 and res.stderr.count("\n") == 1 and says in res.stderr, res.stderr


def test_a_blank_or_transparent_image_has_no_digit(tiny_ckpt, tmp_path):
    black, clear = tmp_path / "black.png", tmp_path / "clear.png"
    Image.new("L", (28, 28), 0).save(black)
    Image.new("RGBA", (50, 40), (0, 0, 0, 0)).save(clear)
    drawn = tmp_path / "drawn.png"  # dark ink on a see-through background, as drawing apps save it
    img = Image.new("RGBA", (50, 40), (0, 0, 0, 0))
    img.paste((0, 0, 0, 255), (22, 5, 28, 35))
    img.save(drawn)
    res = cli("predict", "--checkpoint", tiny_ckpt, str(black), str(clear), str(drawn))
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].endswith("no digit found (the image is blank)") and lines[1].endswith("(the image is blank)")
    assert "no digit" not in lines[2] and lines[2].split("\t")[1].isdigit()


def test_a_model_too_large_for_memory_is_refused_in_one_line(tiny_data, tmp_path):
    res = run_train(1, tiny_data, tmp_path / "run", "--hidden", "10000000")
    assert res.returncode == 2 and "the model does not fit: --hidden 10000000" in res.stderr
    assert res.stderr.count("\n") == 1, res.stderr
