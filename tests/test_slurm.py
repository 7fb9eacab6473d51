"""Against a real Slurm (tests/slurm/cluster.sh): sbatch, submitit, preemption and requeue, arrays,
two nodes. Skipped, loudly, only where Slurm cannot be installed."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from helpers import (
    SMALL_RUN, ROOT, assert_same_params, follow_requeued, job_env, metrics, run_train, slurm_log, summary, wait_for,
)

pytestmark = pytest.mark.slurm
CLUSTER = ROOT / "tests" / "slurm" / "cluster.sh"
FLAGS = ["--epochs", "2", *SMALL_RUN, "--no-verify-data"]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """Start the cluster for this module; stop exactly its daemons afterwards, pass or fail."""
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        warnings.warn("SLURM TESTS SKIPPED: need root and apt-get to install slurm-wlm", stacklevel=2)
        pytest.skip("SLURM TESTS SKIPPED: need root and apt-get to install slurm-wlm")
    folder = Path(f"/tmp/slurm-{os.getpid()}")  # short: munge's socket path must stay under 108 bytes
    start = subprocess.run([str(CLUSTER), "start", str(folder)], capture_output=True, text=True, timeout=600)
    if start.returncode != 0 and not shutil.which("slurmctld"):
        warnings.warn(f"SLURM TESTS SKIPPED: Slurm could not be installed: {start.stderr[-500:]}", stacklevel=2)
        pytest.skip(f"SLURM TESTS SKIPPED: Slurm could not be installed: {start.stderr[-500:]}")
    try:
        assert start.returncode == 0, start.stderr
        yield {**job_env(), "SLURM_CONF": str(folder / "etc" / "slurm.conf"), "PYTHON": sys.executable,
               "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    finally:
        subprocess.run([str(CLUSTER), "stop", str(folder)], capture_output=True, timeout=120)


def sbatch(env: dict, tmp: Path, *args: str, script: str = "slurm/train.sbatch", wait: bool = True,
           **knobs: str) -> subprocess.CompletedProcess | subprocess.Popen:
    """sbatch [SBATCH OPTIONS --] SCRIPT TRAIN FLAGS, knobs as environment variables."""
    opts, flags = (
        (list(args[: args.index("--")]), list(args[args.index("--") + 1 :])) if "--" in args else ([], list(args))
    )
    output = f"{tmp}/%x-%A_%a.out" if any(o.startswith("--array") for o in opts) else f"{tmp}/%x-%j.out"
    cmd = ["sbatch", "--parsable", f"--chdir={ROOT}", f"--output={output}", *(["--wait"] if wait else []), *opts,
           str(ROOT / script), *flags]
    env = {**env, **knobs}
    if wait:
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sbatch_two_tasks_trains_with_world_size_two_after_the_doctor(slurm, tiny_data, tmp_path):
    run = tmp_path / "run"
    res = sbatch(slurm, tmp_path, "--no-verify-data", DATA_DIR=str(tiny_data), RUN_DIR=str(run), EPOCHS="1",
                 DOCTOR="1")
    assert res.returncode == 0, res.stderr
    job = res.stdout.strip()
    assert summary(run)["world_size"] == 2 and summary(run)["epochs"] == 1
    log = slurm_log(tmp_path, job)
    assert "(ranks 0, 1)" in log and "1 node, 2 rank(s): all well" in log, "DOCTOR=1 checks the nodes first"
    assert log.index("all well") < log.index("epoch 1/1")
    assert "restart 0" in log and "exit 0" in log and "test accuracy" in log
    assert log.count("epoch 1/1") == 1, "only rank 0 prints progress"


def test_two_nodes(slurm, tiny_data, tmp_path):
    """Two slurmd nodes on this machine: a real --nodes=2 job, rendezvous at the first host's name."""
    run = tmp_path / "run"
    res = sbatch(slurm, tmp_path, "--nodes=2", "--ntasks-per-node=1", "--", "--no-verify-data", DATA_DIR=str(tiny_data),
                 RUN_DIR=str(run), EPOCHS="1")
    assert res.returncode == 0, res.stderr
    assert "on n[1-2]" in slurm_log(tmp_path, res.stdout.strip())
    assert summary(run)["world_size"] == 2


def test_bad_flag_fails_fast_and_is_not_requeued(slurm, tiny_data, tmp_path):
    res = sbatch(slurm, tmp_path, "--lr", "-1", DATA_DIR=str(tiny_data), RUN_DIR=str(tmp_path / "run"))
    assert res.returncode == 2
    log = slurm_log(tmp_path, res.stdout.strip())
    assert "--lr must be a positive number" in log and "requeueing" not in log


@pytest.fixture(scope="module")
def uninterrupted(slurm, medium_data, tmp_path_factory) -> Path:
    """The run dir of one uninterrupted 2-task sbatch job: the model every interrupted job must end with."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    res = sbatch(slurm, tmp, *FLAGS, DATA_DIR=str(medium_data), RUN_DIR=str(tmp / "run"))
    assert res.returncode == 0, res.stderr
    return tmp / "run"


def usr1_then_follow(slurm: dict, tmp: Path, job: str, proc: subprocess.Popen) -> str:
    """What Slurm's --signal=USR1@90 does near the time limit, USR1 to the job's steps; then the job's log
    once the requeued job finished (sbatch --wait may return at the requeue, so the log is followed)."""
    subprocess.run(["scancel", "--signal=USR1", job], env=slurm, check=True)
    log = follow_requeued(slurm, tmp, job)
    proc.kill()
    return log


def test_sbatch_preempted_job_requeues_and_resumes_to_the_same_model(slurm, uninterrupted, medium_data, tmp_path):
    run = tmp_path / "run"
    proc = sbatch(slurm, tmp_path, *FLAGS, wait=False, DATA_DIR=str(medium_data), RUN_DIR=str(run))
    job = proc.stdout.readline().strip()
    wait_for(lambda: any(r.get("step", 0) >= 100 for r in metrics(run)), what="step 100")
    log = usr1_then_follow(slurm, tmp_path, job, proc)
    assert (
        "stopped by SIGUSR1" in log and "requeueing job" in log and "restart 1" in log and "resuming at epoch 1" in log
    )
    assert_same_params(run, uninterrupted)  # the resumed job ends with the uninterrupted job's model
    assert summary(run)["test_acc"] == summary(uninterrupted)["test_acc"]


def test_srun_torchrun_passes_the_preemption_signal_to_the_ranks_and_requeues(
    slurm, uninterrupted, medium_data, tmp_path
):
    """LAUNCHER=torchrun: one srun task per node, each a torchrun agent (c10d) with --signals-to-handle,
    on both slurmd nodes. USR1 to the job's steps (what --signal=USR1@90 sends) reaches the ranks through
    the agents: checkpoint, requeue, and the job finishes with the uninterrupted srun job's model."""
    run = tmp_path / "run"
    proc = sbatch(slurm, tmp_path, "--nodes=2", "--ntasks-per-node=1", "--", *FLAGS, wait=False,
                  DATA_DIR=str(medium_data), RUN_DIR=str(run), LAUNCHER="torchrun")
    job = proc.stdout.readline().strip()
    wait_for(lambda: any(r.get("step", 0) >= 100 for r in metrics(run)) or "] exit" in slurm_log(tmp_path, job),
             what="step 100")
    log = usr1_then_follow(slurm, tmp_path, job, proc)
    assert "stopped by SIGUSR1" in log and "requeueing job" in log and "restart 1" in log, log[-3000:]
    assert "resuming at epoch 1" in log
    assert_same_params(run, uninterrupted)


def task_pid(job: str, rank: int) -> int:
    """The pid of the Python process that is rank `rank` (an srun task) of Slurm job `job`."""
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            env, cmd = (proc / "environ").read_bytes().split(b"\0"), (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if (f"SLURM_JOB_ID={job}".encode() in env and f"SLURM_PROCID={rank}".encode() in env
                and b"python" in cmd[0] and b"mnist_dist.train" in cmd):
            return int(proc.name)
    raise AssertionError(f"no rank {rank} of job {job}")


def hang_a_task(slurm: dict, tmp: Path, data: Path, run: Path, **knobs: str) -> str:
    """Submit a 2-task job with a 5 s --hang-timeout (checkpoints every 50 steps); SIGSTOP its rank 1 at
    step 100. Returns the job id."""
    proc = sbatch(
        slurm, tmp, *FLAGS, "--hang-timeout", "5", "--ckpt-every", "50", wait=False, DATA_DIR=str(data),
        RUN_DIR=str(run), **knobs,
    )
    job = proc.stdout.readline().strip()
    wait_for(lambda: any(r.get("step", 0) >= 100 for r in metrics(run)), timeout=120, what="step 100")
    os.kill(task_pid(job, 1), signal.SIGSTOP)
    return job


def test_a_hung_task_is_requeued_and_the_job_finishes(slurm, medium_data, tmp_path):
    run = tmp_path / "run"
    job = hang_a_task(slurm, tmp_path, medium_data, run)
    log = follow_requeued(slurm, tmp_path, job)
    assert "no progress on any rank for" in log and "waiting for rank 1 (pid" in log
    assert "a rank hung: requeueing job" in log and "(hang requeue 1 of 3)" in log
    assert "restart 1" in log and "resuming at epoch" in log
    assert summary(run)["epochs"] == 2 and summary(run)["world_size"] == 2


def test_a_job_that_keeps_hanging_is_not_requeued_forever(slurm, medium_data, tmp_path):
    run = tmp_path / "run"
    job = hang_a_task(slurm, tmp_path, medium_data, run, HANG_REQUEUES="0")
    wait_for(lambda: "] exit" in slurm_log(tmp_path, job), timeout=120, what="the job to end")
    log = slurm_log(tmp_path, job)
    assert "not requeueing (HANG_REQUEUES=0" in log and "] exit 76" in log and "restart 1" not in log


def submit(slurm: dict, tmp: Path, *train_flags: str, extra: tuple = ()) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "launch" / "submit.py"), "--ntasks-per-node", "2", "--time", "10",
           "--folder", str(tmp / "submitit" / "%j"), *extra, "--", *train_flags]
    return subprocess.run(cmd, env=slurm, capture_output=True, text=True, timeout=300, cwd=tmp)


def test_submitit_launcher_returns_the_summary(slurm, tiny_data, tmp_path):
    run = tmp_path / "run"
    res = submit(slurm, tmp_path, "--data-dir", str(tiny_data), "--run-dir", str(run), "--epochs", "1",
                 "--no-verify-data", extra=("--wait",))
    assert res.returncode == 0, res.stderr
    assert "submitted job" in res.stdout and f"run dir {run}" in res.stdout and "stdout" in res.stdout
    result = json.loads(res.stdout[res.stdout.index("{"):])
    assert result["world_size"] == 2 and result["test_acc"] == summary(run)["test_acc"]
    script = next((tmp_path / "submitit").rglob("*_submission.sh")).read_text()
    assert "srun" in script and "--kill-on-bad-exit=1" in script, "a task that fails ends the step"


def test_exact_gives_one_process_bits_under_srun_and_submitit(slurm, tiny_data, tmp_path):
    """--exact whatever the launcher: 2 srun tasks (sbatch) and 2 submitit tasks end with the fingerprint
    of one plain process."""
    flags = ("--exact", "--batch-size", "16", "--epochs", "1", "--seed", "5", "--no-verify-data")  # 4 pieces
    one, srun_run, submitit_run = tmp_path / "one", tmp_path / "srun", tmp_path / "submitit-run"
    res = run_train(1, tiny_data, one, *flags)
    assert res.returncode == 0, res.stderr
    res = sbatch(slurm, tmp_path, "--", *flags, DATA_DIR=str(tiny_data), RUN_DIR=str(srun_run))
    assert res.returncode == 0, res.stderr
    res = submit(
        slurm, tmp_path, "--data-dir", str(tiny_data), "--run-dir", str(submitit_run), *flags, extra=("--wait",)
    )
    assert res.returncode == 0, res.stderr
    assert summary(srun_run)["world_size"] == summary(submitit_run)["world_size"] == 2
    assert summary(srun_run)["fingerprint"] == summary(submitit_run)["fingerprint"] == summary(one)["fingerprint"]
    assert summary(srun_run)["test_loss"] == summary(one)["test_loss"]


def test_submitit_interrupt_checkpoints_requeues_and_resumes(slurm, uninterrupted, medium_data, tmp_path):
    """job._interrupt(): SIGTERM (bypassed) then USR2 to the tasks; checkpoint(), requeue, resume."""
    run = tmp_path / "run"
    script = ROOT / "tests" / "scripts" / "submitit_interrupt.py"
    res = subprocess.run([sys.executable, str(script), str(tmp_path / "sub" / "%j"), str(run), *FLAGS, "--data-dir",
                          str(medium_data)], env=slurm, capture_output=True, text=True, timeout=400, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    logs = "".join(p.read_text() for p in (tmp_path / "sub").rglob("*_log.*"))
    assert "resuming at epoch 1" in logs
    assert_same_params(run, uninterrupted)
    assert float(res.stdout.split()[-1]) == summary(uninterrupted)["test_acc"]


def test_array_sweep_and_report(slurm, tiny_data, tmp_path):
    sweep = tmp_path / "sweep"
    res = sbatch(slurm, tmp_path, "--array=0-2", "--", "--no-verify-data", script="slurm/sweep.sbatch",
                 DATA_DIR=str(tiny_data), SWEEP_DIR=str(sweep), GRID="hidden=16,32,64", EPOCHS="1")
    assert res.returncode == 0, res.stderr
    runs = sorted(p.parent.name for p in sweep.glob("*/summary.json"))
    assert runs == ["hidden=16", "hidden=32", "hidden=64"]
    rep = subprocess.run([sys.executable, "-m", "mnist_dist.cli", "sweep-report", str(sweep)], cwd=ROOT,
                         env=job_env(), capture_output=True, text=True, timeout=120)
    assert rep.returncode == 0, rep.stderr
    assert rep.stdout.count("hidden=") == 3 and "test_acc" in rep.stdout
    assert (sweep / "sweep.png").stat().st_size > 5000
