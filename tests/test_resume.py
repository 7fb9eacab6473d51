"""Checkpoints and exact resume: signals, killed workers, corrupt and malicious files."""
from __future__ import annotations

import io
import os
import pickle
import signal
import subprocess
import sys

import pytest
import torch

from helpers import (ROOT, SMALL_RUN, assert_same_params, final_ckpt, job_env, kill_worker, metrics, run_train,
                     send_when_step, start_train, summary, wait_for)
from mnist_dist import files
from mnist_dist.errors import EXIT_DIVERGED, EXIT_PREEMPTED

pytestmark = pytest.mark.slow  # whole training runs, several per test (left out by `make test-quick`)

FLAGS = ("--epochs", "2", *SMALL_RUN)


@pytest.fixture(scope="module")
def reference(medium_data, tmp_path_factory):
    """An uninterrupted one-process run to compare against."""
    return trained(1, medium_data, tmp_path_factory.mktemp("reference") / "run", *FLAGS)


def trained(nproc, data, run, *flags):
    """An uninterrupted run that must succeed."""
    res = run_train(nproc, data, run, *flags)
    assert res.returncode == 0, res.stderr
    return run


def interrupted(nproc, data, run, sig, at_step, *flags):
    """Start a run, send `sig` once it logged step `at_step`, wait for it: (exit code, stderr)."""
    proc = start_train(nproc, data, run, *flags)
    send_when_step(proc, run, sig, at_step)
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err


def assert_same_model(run, reference):
    """Bitwise the uninterrupted run's parameters, and so its test accuracy."""
    assert_same_params(run, reference)
    assert summary(run)["test_acc"] == summary(reference)["test_acc"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2])
def test_signal_checkpoints_mid_epoch_and_resume_is_exact(medium_data, tmp_path, reference, sig):
    """A stop signal mid-epoch: checkpoint, exit 75; the same command resumes to bitwise the same model."""
    run = tmp_path / "run"
    code, err = interrupted(1, medium_data, run, sig, 100, *FLAGS)
    assert code == EXIT_PREEMPTED, err
    assert f"stopped by {signal.Signals(sig).name}" in err and "run the same command again" in err
    state = torch.load(final_ckpt(run), weights_only=True)
    assert state["epoch"] == 0 and 0 < state["batch_in_epoch"] < 1024, "interrupted in the middle of epoch 1"
    res = run_train(1, medium_data, run, *FLAGS)
    assert res.returncode == 0, res.stderr
    assert "resuming at epoch 1" in res.stdout
    assert_same_model(run, reference)
    steps = [r["step"] for r in metrics(run) if "train_loss" in r]
    assert steps == sorted(set(steps)) and steps == [r["step"] for r in metrics(reference) if "train_loss" in r], \
        "metrics.jsonl has no repeated or missing steps after the resume"


def test_sigterm_to_torchrun_then_resume_with_two_ranks(medium_data, tmp_path):
    """torchrun forwards SIGTERM to its workers: both ranks agree, rank 0 checkpoints, the rerun resumes."""
    ref = trained(2, medium_data, tmp_path / "ref", *FLAGS)
    run = tmp_path / "run"
    code, err = interrupted(2, medium_data, run, signal.SIGTERM, 100, *FLAGS)
    assert code != 0
    assert "stopped by SIGTERM" in err
    res = run_train(2, medium_data, run, *FLAGS)
    assert res.returncode == 0, res.stderr
    assert_same_model(run, ref)


def test_killed_worker_is_restarted_by_torchrun_and_finishes(medium_data, tmp_path, reference):
    """kill -9 of one worker under --max-restarts: the group restarts from the newest checkpoint."""
    ref = trained(2, medium_data, tmp_path / "ref", *FLAGS, "--ckpt-every", "100")
    run = tmp_path / "run"
    proc = start_train(2, medium_data, run, *FLAGS, "--ckpt-every", "100", restarts=2)
    wait_for(lambda: any(p.name.startswith("ckpt-") for p in (run / "checkpoints").glob("*.pt")), what="a checkpoint")
    kill_worker(proc)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "resuming at epoch" in out
    assert_same_model(run, ref)


def test_atomic_save_interrupted_before_rename_keeps_old_checkpoint(tmp_path):
    """A process that dies between writing and renaming leaves the old file whole and no partial one."""
    target = tmp_path / "ckpt-00000001.pt"
    saved = io.BytesIO()
    torch.save({"v": torch.ones(3)}, saved)
    files.atomic_write(target, saved.getvalue())
    code = ("import io, os, torch; from pathlib import Path; from mnist_dist import files\n"
            "os.replace = lambda *a: os._exit(9)  # the crash: after write+fsync, before the rename\n"
            "buf = io.BytesIO(); torch.save({'v': torch.zeros(3)}, buf)\n"
            f"files.atomic_write(Path({str(target)!r}), buf.getvalue())\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 9
    assert torch.equal(torch.load(target, weights_only=True)["v"], torch.ones(3))
    assert [p.name for p in tmp_path.glob("ckpt-*.pt")] == [target.name]


def test_corrupt_newest_checkpoint_is_skipped(medium_data, tmp_path, reference):
    run = tmp_path / "run"
    assert run_train(1, medium_data, run, *FLAGS, "--epochs", "1", "--ckpt-every", "256").returncode == 0
    newest = final_ckpt(run)
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # truncated
    res = run_train(1, medium_data, run, *FLAGS)
    assert res.returncode == 0, res.stderr
    assert "skipping checkpoint" in res.stderr and "corrupt or truncated" in res.stderr
    assert "resuming at epoch 1, batch 768" in res.stdout
    assert_same_model(run, reference)


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_checkpoint_is_refused_and_its_code_never_runs(tiny_data, tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "run" / "checkpoints" / "ckpt-00009999.pt"
    evil.parent.mkdir(parents=True)
    torch.save({"format_version": 1, "model": Payload(marker)}, evil)
    for cmd in ([sys.executable, "-m", "mnist_dist.cli", "evaluate", "--checkpoint", str(evil)],
                [sys.executable, "-m", "mnist_dist.train", "--data-dir", str(tiny_data), "--run-dir",
                 str(tmp_path / "run"), "--no-verify-data"]):
        res = subprocess.run(cmd, cwd=ROOT, env=job_env(), capture_output=True, text=True, timeout=60)
        assert res.returncode == 2, res.stderr
        assert "refused: it carries pickled code" in res.stderr and "Traceback" not in res.stderr
    assert not marker.exists(), "the payload ran"
    with pytest.raises(pickle.UnpicklingError):  # the file really carries code: plain pickle would run it
        torch.load(evil, weights_only=True)


def test_no_resume_refuses_to_overwrite_and_overwrite_starts_fresh(tiny_data, tmp_path):
    run = tmp_path / "run"
    assert run_train(1, tiny_data, run, "--epochs", "1").returncode == 0
    res = run_train(1, tiny_data, run, "--epochs", "1", "--no-resume")
    assert res.returncode == 2 and "holds checkpoints" in res.stderr
    res = run_train(1, tiny_data, run, "--epochs", "1", "--no-resume", "--overwrite")
    assert res.returncode == 0 and "resuming" not in res.stdout


def test_resume_refuses_a_different_model(tiny_data, tmp_path):
    run = tmp_path / "run"
    assert run_train(1, tiny_data, run, "--epochs", "1").returncode == 0
    res = run_train(1, tiny_data, run, "--epochs", "2", "--hidden", "64", "--lr", "0.01")
    assert res.returncode == 2
    assert "--hidden 128 (saved) vs 64 (now)" in res.stderr and "--lr" in res.stderr


def test_resume_from_a_given_path_with_another_world_size(tiny_data, tmp_path):
    """--resume PATH; a checkpoint saved by 1 rank continues on 2 ranks (same global batch)."""
    first = tmp_path / "first"
    assert run_train(1, tiny_data, first, "--epochs", "1", "--batch-size", "16").returncode == 0
    res = run_train(2, tiny_data, tmp_path / "second", "--epochs", "2", "--batch-size", "16",
                    "--resume", str(first / "checkpoints" / "best.pt"))
    assert res.returncode == 0, res.stderr
    assert "saved with world size 1, now 2" in res.stdout
    assert summary(tmp_path / "second")["world_size"] == 2


def test_nan_loss_stops_with_the_step_and_keeps_last_good_checkpoint(tiny_data, tmp_path):
    run = tmp_path / "run"
    res = run_train(1, tiny_data, run, "--epochs", "1", "--batch-size", "16", "--lr", "1e30")
    assert res.returncode in (0, EXIT_DIVERGED)
    run2 = tmp_path / "run2"
    res = run_train(1, tiny_data, run2, "--epochs", "3", "--batch-size", "16", "--lr", "1e30", "--log-every", "4")
    assert res.returncode == EXIT_DIVERGED, res.stderr
    assert "loss became nan at step" in res.stderr or "loss became inf at step" in res.stderr
    for ckpt in (run2 / "checkpoints").glob("ckpt-*.pt"):
        assert all(torch.isfinite(v).all() for v in torch.load(ckpt, weights_only=True)["model"].values())


@pytest.mark.parametrize("nproc, sig", [(1, signal.SIGUSR1), (2, signal.SIGTERM)])  # torchrun forwards SIGTERM
def test_cnn_with_dropout_resumes_exactly(small_data, tmp_path, nproc, sig):
    """The CNN draws dropout masks from the RNG: the checkpoint's RNG state makes its resume exact too,
    on 2 ranks as well (every rank's RNG stays in step with rank 0's, whose state the checkpoint saves)."""
    flags = ("--model", "cnn", "--epochs", "1", "--batch-size", "8", "--log-every", "10")
    ref = trained(nproc, small_data, tmp_path / "ref", *flags)
    run = tmp_path / "run"
    code, err = interrupted(nproc, small_data, run, sig, 50, *flags)
    assert f"stopped by {sig.name}" in err
    assert code == (EXIT_PREEMPTED if nproc == 1 else 1), err  # torchrun ends with 1 when its workers failed
    assert run_train(nproc, small_data, run, *flags).returncode == 0
    assert_same_model(run, ref)


def test_a_rank_whose_peer_died_says_so_in_one_line(medium_data, tmp_path):
    """kill -9 of rank 0 under torchrun (no restarts): rank 1 ends with one line, not a traceback."""
    run = tmp_path / "run"
    proc = start_train(2, medium_data, run, *FLAGS, "--epochs", "50")
    send_when_step(proc, run, signal.SIGCONT, 100)  # (a harmless signal: only waits for step 100)
    kill_worker(proc, 0)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "mnist_dist/" not in err, "no traceback from the ranks"
    lines = [line for line in err.splitlines() if line.startswith("mnist-dist: error:")]
    assert len(lines) <= 1 and all("rank 1 stops: it lost contact with another rank" in line for line in lines), err


def test_the_epoch_line_after_a_mid_epoch_resume_counts_only_the_samples_it_trained(medium_data, tmp_path):
    """Stopped at step ~800 of 1024, the resumed run trains the epoch's last ~224 steps: its samples/s is
    theirs, not the whole epoch's samples over a fifth of its time."""
    run = tmp_path / "run"
    code, err = interrupted(1, medium_data, run, signal.SIGTERM, 800, *FLAGS, "--epochs", "1")
    assert code == EXIT_PREEMPTED, err
    res = run_train(1, medium_data, run, *FLAGS, "--epochs", "1")
    assert res.returncode == 0, res.stderr
    printed = float(res.stdout.split(" samples/s")[0].split()[-1].replace(",", ""))
    resumed_at = int(res.stdout.split("(step ")[1].split(")")[0])
    rates = sorted(r["samples_per_s"] for r in metrics(run) if "samples_per_s" in r and r["step"] > resumed_at)
    median = rates[len(rates) // 2]
    assert median / 2 < printed < median * 2, (printed, rates)
