"""The submitit launchers without Slurm (--local), and the launchers' own input checks."""
from __future__ import annotations

import socket
import subprocess
import sys

from helpers import ROOT, job_env, summary

from mnist_dist.distributed import first_host, free_port, read_env, slurm_port
from mnist_dist.sweep import expand, point_name


def launch(script: str, *args: str, cwd=None) -> subprocess.CompletedProcess:
    """submitit's local executor picks the ranks' port from the job id (a pid) in 20000-60000, which is
    where the kernel's ephemeral ports live on a busy machine: the tests hand one job (submit.py) one that is
    free (a sweep's several jobs need one each: submitit's own pick)."""
    env = job_env(MASTER_PORT=str(free_port())) if script == "submit.py" else job_env()
    return subprocess.run([sys.executable, str(ROOT / "launch" / script), *args], cwd=cwd or ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_submit_local_runs_two_ranks(tiny_data, tmp_path):
    run = tmp_path / "run"
    res = launch("submit.py", "--local", "--ntasks-per-node", "2", "--folder", str(tmp_path / "sub" / "%j"), "--wait",
                 "--", "--data-dir", str(tiny_data), "--no-verify-data", "--run-dir", str(run), "--epochs", "1")
    assert res.returncode == 0, res.stderr
    assert summary(run)["world_size"] == 2 and '"world_size": 2' in res.stdout


def test_submit_doctor_checks_the_jobs_tasks_and_dirs(tiny_data, tmp_path):
    """--doctor runs `mnist-dist doctor` on the tasks the job would get, with its --data-dir and --run-dir:
    its table and verdict come back; a data dir without MNIST is one line and exit 1."""
    common = ("--local", "--ntasks-per-node", "2", "--wait", "--doctor")
    res = launch("submit.py", *common, "--folder", str(tmp_path / "ok" / "%j"), "--", "--data-dir", str(tiny_data),
                 "--no-verify-data", "--run-dir", str(tmp_path / "run"))
    assert res.returncode == 0, res.stderr
    assert "node " in res.stdout and "(ranks 0, 1)" in res.stdout and "1 node, 2 rank(s): all well" in res.stdout
    bad = launch("submit.py", *common, "--folder", str(tmp_path / "bad" / "%j"), "--", "--data-dir",
                 str(tmp_path / "none"), "--run-dir", str(tmp_path / "run"))
    assert bad.returncode == 1
    assert [line for line in bad.stderr.splitlines() if line.startswith("mnist-dist: error:")] == [
        f"mnist-dist: error: rank {r} on {socket.gethostname()}: MNIST file train-images-idx3-ubyte is missing in "
        f"{tmp_path / 'none' / 'MNIST' / 'raw'}: run `mnist-dist download --data-dir {tmp_path / 'none'}` on a machine "
        f"with internet, or put the four IDX files in {tmp_path / 'none' / 'MNIST' / 'raw'}" for r in (0, 1)]


def test_submit_refuses_bad_train_flags_before_queueing(tmp_path):
    res = launch("submit.py", "--local", "--folder", str(tmp_path / "sub"), "--", "--epochs", "0")
    assert res.returncode == 2 and "--epochs must be positive" in res.stderr
    assert not (tmp_path / "sub").exists(), "nothing was submitted"


def test_local_sweep_writes_one_run_per_point_and_a_report(tiny_data, tmp_path):
    sweep = tmp_path / "sweep"
    res = launch("sweep.py", "--local", "--folder", str(tmp_path / "sub" / "%j"), "--grid", "hidden=16,32",
                 "lr=0.001,0.01", "--sweep-dir", str(sweep), "--wait", "--", "--data-dir", str(tiny_data),
                 "--no-verify-data", "--epochs", "1")
    assert res.returncode == 0, res.stderr
    assert len(list(sweep.glob("*/summary.json"))) == 4
    assert "hidden=16,lr=0.01" in res.stdout and (sweep / "sweep.png").exists()


def test_submit_refuses_more_ranks_than_gpus_before_queueing(tmp_path):
    res = launch("submit.py", "--local", "--gpus-per-node", "1", "--ntasks-per-node", "2", "--folder",
                 str(tmp_path / "sub"), "--", "--epochs", "1")
    assert res.returncode == 2 and "ranks would share a GPU" in res.stderr
    assert not (tmp_path / "sub").exists(), "nothing was submitted"


def test_grid_expansion_and_bad_grid():
    points = expand(["lr=1e-3,3e-3", "hidden=64,128"])
    assert (
        len(points) == 4 and points[0] == {"lr": 0.001, "hidden": 64} and point_name(points[3]) == "lr=0.003,hidden=128"
    )
    res = subprocess.run(
        [sys.executable, "-m", "mnist_dist.sweep", "point", "--grid", "hidden=a,b", "--index", "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 2 and "values must be int" in res.stderr


def test_rendezvous_from_slurm_variables():
    """srun sets only Slurm's variables: the first host of the allocation and a port from the job id."""
    env = {"SLURM_STEP_NUM_TASKS": "4", "SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "123457",
           "SLURM_JOB_NODELIST": "gpu-a[003-005,009],cpu1"}
    d = read_env(env)
    assert (d.rank, d.local_rank, d.world_size, d.master_addr, d.master_port) == (3, 1, 4, "gpu-a003", 23457)
    assert slurm_port("123457") != slurm_port("123458"), "two jobs on one node get different ports"
    assert first_host("n1") == "n1" and first_host("node[12-14]") == "node12"
    torchrun = {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "555", **env}
    assert read_env(torchrun).master_port == 555 and read_env(torchrun).world_size == 2, "torchrun's variables win"
