"""Hung ranks and shared run dirs: the hang watchdog (a real SIGSTOP) and the run-dir lock."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import (ROOT, SMALL_RUN, assert_same_params, job_env, metrics, run_train, start_train, summary,
                     wait_for, worker_pid, write_idx)
from mnist_dist import postmortem
from mnist_dist.errors import EXIT_HUNG, EXIT_USAGE

pytestmark = pytest.mark.slow  # whole training runs, several per test (left out by `make test-quick`)

HANG = 6  # --hang-timeout of these tests, in seconds
FLAGS = (*SMALL_RUN, "--ckpt-every", "100", "--hang-timeout", str(HANG))


def stop_rank_at_step(proc, run: Path, rank: int, step: int = 100) -> int:
    wait_for(lambda: any(r.get("step", 0) >= step for r in metrics(run)) or proc.poll() is not None,
             timeout=120, what=f"step {step}")
    assert proc.poll() is None, proc.communicate()
    pid = worker_pid(proc, rank)
    os.kill(pid, signal.SIGSTOP)
    return pid


@pytest.fixture(scope="module", params=[1, 0], ids=["rank1-stopped", "rank0-stopped"])
def stopped_job(request, medium_data, tmp_path_factory):
    """A 2-rank job whose rank `stopped` is SIGSTOPped mid-epoch, run to its end: what the tests read.
    The collectives' Flight Recorder records (as it does by default with NCCL)."""
    stopped, run = request.param, tmp_path_factory.mktemp("stopped") / "run"
    proc = start_train(2, medium_data, run, *FLAGS, "--epochs", "50", env=job_env(TORCH_FR_BUFFER_SIZE="100"))
    pid = stop_rank_at_step(proc, run, stopped)
    start = time.monotonic()
    _, err = proc.communicate(timeout=HANG + 120)
    return {"stopped": stopped, "pid": pid, "run": run, "err": err, "code": proc.returncode,
            "took": time.monotonic() - start}


def test_a_stopped_rank_ends_the_job_with_the_hang_code_naming_it(stopped_job):
    """SIGSTOP of one worker mid-epoch: every live rank stops within the limit, one line names the rank."""
    err, stopped, pid = stopped_job["err"], stopped_job["stopped"], stopped_job["pid"]
    assert stopped_job["code"] != 0 and f"exitcode  : {EXIT_HUNG}" in err, err
    assert err.count("no progress on any rank for") == 1, err
    assert f"(--hang-timeout {HANG}) at step" in err and f"waiting for rank {stopped} (pid {pid} on" in err
    assert stopped_job["took"] < HANG + 30, f"the job took {stopped_job['took']:.0f} s to end"


def test_the_hang_line_names_the_post_mortem_folder(stopped_job):
    [folder] = (stopped_job["run"] / "hangs").iterdir()
    assert f"what each rank was doing is in {folder} (mnist-dist hangs {stopped_job['run']})" in stopped_job["err"]


def test_the_live_ranks_post_mortem_shows_it_waiting_in_a_training_collective(stopped_job):
    """The live rank was stopped by its peer's absence in the step's gradient averaging (or, if the peer
    stopped between the two, the sync point's all_reduce): its file says which, with its stacks."""
    live = 1 - stopped_job["stopped"]
    [folder] = (stopped_job["run"] / "hangs").iterdir()
    assert sorted(p.name for p in folder.iterdir()) == [f"rank-{live}.flight-recorder.json", f"rank-{live}.txt"], \
        "the stopped rank wrote nothing"
    report = postmortem.read_report(folder / f"rank-{live}.txt")
    collective = report["last collective"]
    assert (report["phase"], collective.split(" (entered")[0]) in {
        ("training step", "DDP's gradient averaging, in backward"),
        ("sync point", "all_reduce of the sync point (losses, right answers, stop flags, per-rank times)")}, report
    assert report["frame"].split()[0] in {"wait_for", "average", "hook", "train_step", "sync"}, report["frame"]
    assert report["waiting for"] == f"rank {stopped_job['stopped']}"
    assert f"(pid {stopped_job['pid']}) seen from /proc on" in (folder / f"rank-{live}.txt").read_text()


def test_the_flight_recorders_record_of_the_collectives_is_kept(stopped_job):
    live = 1 - stopped_job["stopped"]
    [folder] = (stopped_job["run"] / "hangs").iterdir()
    entries = json.loads((folder / f"rank-{live}.flight-recorder.json").read_text())["entries"]
    assert entries and {e["profiling_name"] for e in entries} >= {"gloo:all_reduce", "gloo:broadcast"}


def test_the_hangs_summary_names_the_stopped_rank_missing_in_its_stopped_state(stopped_job):
    res = subprocess.run([sys.executable, "-m", "mnist_dist.cli", "hangs", str(stopped_job["run"])], cwd=ROOT,
                         env=job_env(), capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    stopped, live = stopped_job["stopped"], 1 - stopped_job["stopped"]
    assert lines[0].endswith(f"the ranks waited for rank {stopped}"), lines
    assert f"rank {stopped}: missing (it could not run Python: state T (stopped))" in lines
    assert any(line.startswith(f"rank {live}: ") and "; in " in line and "mnist_dist/" in line for line in lines), lines


def test_a_rank_stuck_writing_a_checkpoint_is_shown_in_that_phase_and_frame(medium_data, tmp_path):
    """Rank 0's epoch-end checkpoint write blocks (its temporary file is a FIFO that nobody reads, as a
    file system that stops answering): the summary shows rank 0 in the checkpoint write, in files.py."""
    run = tmp_path / "run"
    proc = start_train(2, medium_data, run, *SMALL_RUN, "--epochs", "2", "--hang-timeout", str(HANG))
    wait_for(lambda: started(proc, 0), what="rank 0 to start")
    (run / "checkpoints").mkdir(parents=True, exist_ok=True)
    os.mkfifo(run / "checkpoints" / f".ckpt-{8192 // 8:08d}.pt.tmp{worker_pid(proc, 0)}")
    _, err = proc.communicate(timeout=HANG + 120)
    assert f"exitcode  : {EXIT_HUNG}" in err, err
    res = subprocess.run([sys.executable, "-m", "mnist_dist.cli", "hangs", str(run)], cwd=ROOT, env=job_env(),
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    [rank0] = [line for line in res.stdout.splitlines() if line.startswith("rank 0: ")]
    assert rank0.startswith("rank 0: checkpoint write;") and "in atomic_write (mnist_dist/files.py:" in rank0, (
        res.stdout
    )
    assert "rank 1: epoch end; last collective all_reduce of the stop flags" in res.stdout, res.stdout


def started(torchrun, rank: int) -> bool:
    try:
        return worker_pid(torchrun, rank) > 0
    except (AssertionError, OSError):  # not yet, or a child that just went
        return False


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
