"""Hung ranks and shared run dirs: the hang watchdog (a real SIGSTOP) and the run-dir lock."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from helpers import SMALL_RUN, assert_same_params, metrics, run_train, start_train, summary, wait_for, worker_pid, write_idx
from mnist_dist.errors import EXIT_HUNG, EXIT_USAGE

HANG = 6  # --hang-timeout of these tests, in seconds
FLAGS = (*SMALL_RUN, "--ckpt-every", "100", "--hang-timeout", str(HANG))


def stop_rank_at_step(proc, run: Path, rank: int, step: int = 100) -> int:
    wait_for(lambda: any(r.get("step", 0) >= step for r in metrics(run)) or proc.poll() is not None,
             timeout=120, what=f"step {step}")
    assert proc.poll() is None, proc.communicate()
    pid = worker_pid(proc, rank)
    os.kill(pid, signal.SIGSTOP)
    return pid


@pytest.mark.parametrize("stopped", [1, 0])
def test_a_stopped_rank_ends_the_job_with_the_hang_code_naming_it(medium_data, tmp_path, stopped):
    """SIGSTOP of one worker mid-epoch: every live rank stops within the limit, one line names the rank."""
    run = tmp_path / "run"
    proc = start_train(2, medium_data, run, *FLAGS, "--epochs", "50")
    pid = stop_rank_at_step(proc, run, stopped)
    start = time.monotonic()
    _, err = proc.communicate(timeout=HANG + 120)
    took = time.monotonic() - start
    assert proc.returncode != 0 and f"exitcode  : {EXIT_HUNG}" in err, err
    assert err.count("no progress on any rank for") == 1, err
    assert f"(--hang-timeout {HANG}) at step" in err and f"waiting for rank {stopped} (pid {pid} on" in err
    assert took < HANG + 30, f"the job took {took:.0f} s to end"


def test_torchrun_restarts_a_hung_group_and_the_resume_is_exact(medium_data, tmp_path):
    """With --max-restarts=1 the hung group is replaced; it resumes from the newest checkpoint and
    ends with the uninterrupted run's test loss and parameters."""
    flags = (*FLAGS, "--epochs", "2")
    ref = tmp_path / "ref"
    res = run_train(2, medium_data, ref, *flags)
    assert res.returncode == 0, res.stderr
    run = tmp_path / "run"
    proc = start_train(2, medium_data, run, *flags, restarts=1)
    stop_rank_at_step(proc, run, 1)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "no progress on any rank" in err and "resuming at epoch" in out
    assert summary(run)["test_loss"] == summary(ref)["test_loss"]
    assert_same_params(run, ref)


@pytest.fixture(scope="module")
def many_test_images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("many-test-images")
    write_idx(folder, 512, 16000, seed=2)
    return folder


def test_a_slow_but_live_phase_longer_than_the_timeout_is_not_a_hang(many_test_images, tmp_path):
    """Rank 0 evaluates the CNN on 16,000 images (longer than 5 s on one core) for longer than --hang-timeout
    while rank 1 waits for its numbers: that is progress, not a hang."""
    run = tmp_path / "run"
    res = run_train(2, many_test_images, run, "--model", "cnn", "--epochs", "1", "--hang-timeout", "5", timeout=300)
    assert res.returncode == 0, res.stderr
    eval_s = [r["eval_s"] for r in metrics(run) if "eval_s" in r]
    assert eval_s and eval_s[0] > 5, f"the evaluation took {eval_s} s: not longer than the timeout, nothing tested"


def logged_steps(steps_per_epoch: int, epochs: int, log_every: int, ckpt_every: int) -> list[int]:
    """The steps metrics.jsonl records: a sync point after log_every steps, at each step checkpoint
    and at each epoch's end."""
    logged, pending = [], 0
    for step in range(1, steps_per_epoch * epochs + 1):
        pending += 1
        if pending == log_every or step % ckpt_every == 0 or step % steps_per_epoch == 0:
            logged.append(step)
            pending = 0
    return logged


def test_a_second_job_on_the_same_run_dir_is_refused_and_the_first_keeps_its_records(medium_data, tmp_path):
    run = tmp_path / "run"
    flags = (*SMALL_RUN, "--ckpt-every", "100", "--epochs", "3")
    first = start_train(2, medium_data, run, *flags)
    wait_for(lambda: any(r.get("step", 0) >= 50 for r in metrics(run)), timeout=120, what="step 50")
    holder = worker_pid(first, 0)
    workers = [worker_pid(first, 0), worker_pid(first, 1)]
    for pid in workers:  # hold the first job mid-run (well within its hang timeout) while the second starts
        os.kill(pid, signal.SIGSTOP)
    start = time.monotonic()
    second = run_train(1, medium_data, run, *flags, timeout=120)
    for pid in workers:
        os.kill(pid, signal.SIGCONT)
    assert second.returncode == EXIT_USAGE and time.monotonic() - start < 30
    assert second.stderr.count("mnist-dist: error:") == 1 and len(second.stderr.splitlines()) == 1, second.stderr
    assert f"is in use by another job (pid {holder} on " in second.stderr
    assert "torchrun restart round 0, since" in second.stderr and "choose another --run-dir" in second.stderr
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    steps = [r["step"] for r in metrics(run) if "train_loss" in r]
    assert steps == logged_steps(8192 // 8, 3, 10, 100), "metrics.jsonl holds every record of the first job, in order"


def test_the_lock_dies_with_a_killed_holder(medium_data, tmp_path):
    """kill -9 of the job that holds the run dir: the next run on it proceeds at once and resumes."""
    run = tmp_path / "run"
    proc = start_train(1, medium_data, run, *FLAGS, "--epochs", "10")
    wait_for(lambda: any((run / "checkpoints").glob("ckpt-*.pt")), timeout=120, what="a checkpoint")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    res = run_train(1, medium_data, run, *FLAGS, "--epochs", "1")
    assert res.returncode == 0, res.stderr
    assert "resuming at epoch 1" in res.stdout and "in use" not in res.stderr


def test_a_rank_that_fails_alone_stops_the_others_at_once(medium_data, tmp_path):
    """Rank 0 cannot write its checkpoint (the path is a folder): rank 1, which waits for it in a
    collective, stops at once with one line saying why, instead of waiting out a timeout."""
    run = tmp_path / "run"
    (run / "checkpoints" / "ckpt-00000100.pt").mkdir(parents=True)
    res = run_train(2, medium_data, run, *FLAGS, "--epochs", "1", timeout=120)
    assert res.returncode != 0
    assert "mnist-dist: error: rank 1 stops: rank 0 failed (WriteFailed: cannot write" in res.stderr, res.stderr
    assert "mnist_dist/" not in res.stderr, "one line each, no traceback"


def test_a_file_system_without_locks_warns_once_and_goes_on(tmp_path, monkeypatch, capsys):
    """Some NFS mounts answer flock with ENOLCK: the job warns and runs unprotected (simulated: this
    machine's file systems all lock)."""
    import errno
    import fcntl

    from mnist_dist import locks

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
    monkeypatch.setattr(fcntl, "flock", no_locks)
    assert locks.hold(tmp_path / ".lock", {"pid": 1}) == (None, None), "no lock taken, nobody else holds it"
    err = capsys.readouterr().err
    assert err.count("mnist-dist: warning: cannot lock") == 1 and "offers no locks" in err
