"""The job in containers as clusters run them, in the namespace harness (tests/hosts.py: own PID namespace,
hostname, /dev/shm and /tmp): torchrun as PID 1 and `mnist-dist init`, a small /dev/shm, no writable HOME."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import hosts as hosts_mod
from helpers import ROOT, job_env, metrics, wait_for, write_idx
from hosts import Hosts
from test_hosts import finish, local, newest_step, one_line_errors, torchrun
from wandb_records import records, run_files, summarize

WHY_NOT = hosts_mod.unavailable()
pytestmark = pytest.mark.slow
needs_hosts = pytest.mark.skipif(WHY_NOT is not None, reason=f"separate hosts: {WHY_NOT}")

AS_PID1 = ["unshare", "--pid", "--fork", "--mount-proc", "--"]  # the command becomes its own PID namespace's first
INIT = [sys.executable, "-m", "mnist_dist.cli", "init", "--"]
PID1_LINE = "mnist-dist: warning: torchrun is PID 1 in this container"


# --- 1. torchrun as PID 1 -----------------------------------------------------------------------------
@needs_hosts
def test_torchrun_as_pid1_is_named_at_start_and_under_mnist_dist_init_a_partition_ends_both_nodes(
        medium_data, tmp_path):
    """Node A runs torchrun as its container's PID 1 (as `docker run image torchrun ...` does): it says so at
    start-up, with the fix. Node B runs it under `mnist-dist init` (the fix). B's cable is cut for good: B's
    rank ends its torchrun with kill -9 (which PID 1 would ignore), the init passes the 137 on, and A ends
    too: both within --hang-timeout + 60 s."""
    hang = 10
    flags = ("--data-dir", str(medium_data), "--run-dir", "/tmp/run", "--epochs", "2", "--hang-timeout", str(hang))
    with Hosts(tmp_path, ["nodeA", "nodeB"]) as (a, b):
        procs = [a.start([*AS_PID1, *torchrun("c10d", 0, *flags)], env=job_env()),
                 b.start([*AS_PID1, *INIT, *torchrun("c10d", 1, *flags)], env=job_env())]
        wait_for(lambda: newest_step(local(a, "/tmp/run")) >= 100 or procs[0].poll() is not None, timeout=120,
                 what="step 100")
        b.cut()
        (code_a, _, err_a, took_a), (code_b, _, err_b, took_b) = finish(procs, [a, b], timeout=hang + 60)
    assert code_a == 1 and code_b == 137, err_a[-2000:] + err_b[-2000:]
    assert err_a.count(PID1_LINE) == 1 and PID1_LINE not in err_b
    [line] = [line for line in err_a.splitlines() if line.startswith(PID1_LINE)]
    assert "docker run --init" in line and "mnist-dist init -- torchrun" in line and "shareProcessNamespace" in line
    assert any("is ended with kill -9" in line for line in one_line_errors(err_b)), err_b[-3000:]
    print(f"partition under mnist-dist init: node A ended {took_a:.1f} s after the cut, node B {took_b:.1f} s")


@needs_hosts
def test_docker_stop_of_torchrun_as_pid1_checkpoints_and_says_so(medium_data, tmp_path):
    """`docker stop` (or a pod's deletion) sends SIGTERM to the container's PID 1, here torchrun itself: its
    ranks checkpoint and say so, and the command exits non-zero (resume by running it again)."""
    flags = ("--data-dir", str(medium_data), "--run-dir", "/tmp/run", "--epochs", "20")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
           "mnist_dist.train", "--no-verify-data", "--no-download", *flags]
    with Hosts(tmp_path, ["node"]) as (host,):
        proc = host.start([*AS_PID1, *cmd], env=job_env())
        wait_for(lambda: any(r.get("step", 0) >= 100 for r in metrics(local(host, "/tmp/run"))) or
                 proc.poll() is not None, timeout=120, what="step 100")
        # unshare's child: PID 1 of the container's namespace; signalled from outside it, as docker stop does
        torchrun_pid = host.sh(f"pgrep -P {host.pid_of(proc)}").split()[0]
        host.run(["kill", "-TERM", torchrun_pid])
        [(code, out, err, _)] = finish([proc], [host], timeout=60)
        saved = newest_step(local(host, "/tmp/run"))
    assert code != 0 and err.count(PID1_LINE) == 1, err[-3000:]
    assert "stopped by SIGTERM" in err and saved > 100, err[-3000:]


@needs_hosts
def test_a_cut_off_torchrun_that_is_pid1_is_named_with_the_fix_not_killed():
    """What the hang line says on a node whose torchrun is PID 1 and cut off from its rendezvous: PID 1 of a
    PID namespace (here a shell that carries torchrun's command line) cannot be ended from inside."""
    probe = "from mnist_dist.watchdog import stop_cut_off_agent; print(stop_cut_off_agent())"
    res = subprocess.run([*AS_PID1, "sh", "-c", f"{sys.executable} -c '{probe}'; true", "sh",
                          "torch.distributed.run", "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:9"],
                         cwd=ROOT, env=job_env(), capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("torchrun's agent is PID 1 of this container, which nothing inside it can end")
    assert "mnist-dist init -- torchrun" in res.stdout


def test_mnist_dist_init_passes_signals_on_reaps_orphans_and_keeps_the_exit_code(tmp_path):
    script = tmp_path / "child.sh"
    script.write_text("trap 'echo got USR1; exit 7' USR1\necho ready\nwhile :; do sleep 0.05; done\n")
    proc = subprocess.Popen([*INIT, "sh", str(script)], cwd=ROOT, stdout=subprocess.PIPE, text=True, env=job_env())
    assert proc.stdout.readline() == "ready\n"
    proc.send_signal(signal.SIGUSR1)  # Slurm's warning signal: a torchrun as PID 1 would drop it
    assert proc.wait(timeout=10) == 7 and proc.stdout.read() == "got USR1\n"
    assert subprocess.run([*INIT, "sh", "-c", "kill -9 $$"], cwd=ROOT, env=job_env()).returncode == 137
    res = subprocess.run([*INIT, "/nonexistent"], cwd=ROOT, env=job_env(), capture_output=True, text=True)
    assert res.returncode == 127 and res.stderr.startswith("mnist-dist: error: mnist-dist init cannot start")


# --- 2. a small /dev/shm ----------------------------------------------------------------------------------
@needs_hosts
@pytest.mark.parametrize("size", ["64k", "1m"])
def test_a_small_dev_shm_is_said_and_never_a_sigbus(size, small_data, tmp_path):
    """The MLP's exchange needs 1.6 MB of /dev/shm for 2 ranks. 64k: too small to make the block; 1m: big
    enough to make its file, not to fill it (a sparse file there would SIGBUS a rank at the first touch of a
    page past the end: the pages are reserved when it is made). Both: one line with the sizes and the
    fixes, and the job trains through gloo."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
           "mnist_dist.train", "--data-dir", str(small_data), "--run-dir", "/tmp/run", "--no-verify-data",
           "--no-download", "--epochs", "2"]
    with Hosts(tmp_path, ["node"]) as (host,):
        host.sh(f"mount -o remount,size={size} /dev/shm")
        [(code, out, err, _)] = finish([host.start(cmd, env=job_env())], [host], timeout=120)
    assert code == 0, err[-3000:]
    warned = [line for line in err.splitlines() if "/dev/shm has" in line]
    assert len(warned) == 1 and "gradients averaged by gloo all_reduce" in out, err[-2000:] + out[-500:]
    assert warned[0].startswith("mnist-dist: warning: /dev/shm has ") and "needs 1.6 MB" in warned[0]
    assert "--shm-size" in warned[0] and "emptyDir" in warned[0]


# --- 3. no writable HOME ---------------------------------------------------------------------------------
def test_a_random_uid_without_a_writable_home_runs_as_completely_and_quietly(tmp_path):
    """As UID 65534 with HOME unwritable (OpenShift, Kubernetes runAsUser, Apptainer), only the run dir and
    /tmp writable: no warning, W&B (offline) gets the figures and the model artifact, matplotlib is quiet;
    W&B's and matplotlib's folders go under RUN_DIR/.home."""
    if os.geteuid() != 0:
        pytest.skip("switching to another UID needs root")
    work = Path(tempfile.mkdtemp(prefix="mnist-dist-uid-"))
    # the interpreter may live under a folder only root may enter (pyenv in /root): let others pass through
    # (not list) the folders above it for the test's length
    above = [p for p in Path(os.path.realpath(sys.executable)).parents if not os.stat(p).st_mode & 0o001]
    modes = {p: os.stat(p).st_mode & 0o7777 for p in above}
    try:
        for path, mode in modes.items():
            path.chmod(mode | 0o001)
        work.chmod(0o755)
        write_idx(work / "data", 512, 200)
        (work / "runs").mkdir(mode=0o777)
        (work / "runs").chmod(0o777)
        home = work / "home"
        home.mkdir(mode=0o555)  # exists, not writable
        env = job_env(HOME=str(home), WANDB_MODE="offline", MPLCONFIGDIR="", XDG_CACHE_HOME="", XDG_CONFIG_HOME="")
        run = work / "runs" / "run"
        res = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m",
                              "mnist_dist.train", "--data-dir", str(work / "data"), "--run-dir", str(run),
                              "--no-verify-data", "--no-download", "--epochs", "2", "--wandb-log-model"],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
        assert res.returncode == 0, res.stderr[-3000:]
        noise = [line for line in res.stderr.splitlines() if line.strip()]
        assert noise == [], "\n".join(noise[:20])
        [log] = run_files(run)
        got = summarize(log)
        assert len([h for h in got["history"] if "predictions/_type" in h]) == 2
        models = [r for r in records(log) if r.WhichOneof("record_type") == "artifact" and r.artifact.type == "model"]
        assert len(models) == 1, "--wandb-log-model: the best checkpoint as an artifact"
        assert got["exit_code"] == 0 and (run / ".home" / "matplotlib").is_dir()
        assert (run / ".home" / "wandb" / "data").is_dir() and not any(home.iterdir())
    finally:
        for path, mode in modes.items():
            path.chmod(mode)
        shutil.rmtree(work, ignore_errors=True)


def test_a_users_own_folders_win_and_a_usable_home_changes_nothing(tmp_path):
    from mnist_dist.container import home_elsewhere

    mine = str(tmp_path / "mine")
    environ = {"HOME": str(tmp_path / "no-such-home"), "MPLCONFIGDIR": mine}
    assert home_elsewhere(tmp_path / "run", environ) == ["WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"]
    assert environ["MPLCONFIGDIR"] == mine and environ["WANDB_DATA_DIR"] == str(tmp_path / "run/.home/wandb/data")
    assert home_elsewhere(tmp_path / "run", {"HOME": str(tmp_path)}) == []
