"""Slurm across separate hosts: slurmctld on "head" (also the login host: sbatch and scontrol run there),
one slurmd on each of "node1" and "node2", each host a namespace of tests/hosts.py with its own hostname,
address, /tmp and munged (one key), the run dir on a folder every host sees (as on a shared filesystem).
slurm/train.sbatch as users submit it: a 2-node job trains; a job of a higher-priority partition
preempts it (Slurm requeues it) and it ends with the uninterrupted job's model; a node cut off mid-job
ends the job within --hang-timeout + 60 s, and once the link is mended the requeued job finishes with
that same model. Skipped, with the reason, where namespaces cannot be made or Slurm installed."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest

import hosts as hosts_mod
from helpers import (
    ROOT, SMALL_RUN, assert_same_params, follow_requeued, job_env, metrics, run_train, slurm_log, summary, wait_for,
)
from hosts import Host, Hosts

WHY_NOT = hosts_mod.unavailable()
pytestmark = [pytest.mark.slurm, pytest.mark.skipif(WHY_NOT is not None, reason=f"separate hosts: {WHY_NOT}")]
CLUSTER = str(ROOT / "tests" / "slurm" / "cluster.sh")
HANG = 10
FLAGS = ("--epochs", "2", *SMALL_RUN, "--no-verify-data", "--ckpt-every", "50", "--hang-timeout", str(HANG))


@dataclass
class Cluster:
    head: Host
    nodes: list[Host]
    env: dict
    folder: Path

    def run(self, argv: list[str], **kwargs) -> subprocess.CompletedProcess:
        """A Slurm command on the login host."""
        return self.head.run(argv, env=self.env, **kwargs)

    def job(self, job: str) -> str:
        return self.run(["scontrol", "show", "job", job, "-o"]).stdout


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if os.geteuid() != 0 or not (shutil.which("slurmctld") or shutil.which("apt-get")):
        warnings.warn("SLURM TESTS SKIPPED: need root and apt-get to install slurm-wlm", stacklevel=2)
        pytest.skip("SLURM TESTS SKIPPED: need root and apt-get to install slurm-wlm")
    folder = tmp_path_factory.mktemp("slurm-hosts")
    with Hosts(folder, ["head", "node1", "node2"]) as (head, *nodes):
        conf = subprocess.run([CLUSTER, "hosts-conf", str(folder), *(f"{h.name}={h.addr}" for h in (head, *nodes))],
                              capture_output=True, text=True, timeout=600)
        assert conf.returncode == 0, conf.stderr
        env = {**job_env(), "SLURM_CONF": str(folder / "slurm.conf"), "PYTHON": sys.executable,
               "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
        for host, daemon in ((head, "slurmctld"), *((n, "slurmd") for n in nodes)):
            host.sh(f"{CLUSTER} daemon {folder} munged && {CLUSTER} daemon {folder} {daemon}")
        up = head.run([CLUSTER, "wait-idle", str(len(nodes))], env=env)
        assert up.returncode == 0, f"{up.stderr}\n{(folder / 'log' / 'slurmctld.log').read_text()[-2000:]}"
        yield Cluster(head, nodes, env, folder)


def submit(cluster: Cluster, tmp: Path, data: Path, run: Path) -> str:
    """sbatch --nodes=2 --ntasks-per-node=1 slurm/train.sbatch FLAGS, on the login host; the job id."""
    cmd = ["sbatch", "--parsable", f"--chdir={ROOT}", f"--output={tmp}/%x-%j.out", "--nodes=2", "--ntasks-per-node=1",
           str(ROOT / "slurm" / "train.sbatch"), *FLAGS]
    res = cluster.head.run(cmd, env={**cluster.env, "DATA_DIR": str(data), "RUN_DIR": str(run)})
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def follow(cluster: Cluster, tmp: Path, job: str) -> str:
    """The job's log once it finished, its requeues started at once from the login host."""
    return follow_requeued(cluster.env, tmp, job, timeout=240, run=cluster.head.run)


def past_step_100(run: Path) -> None:
    wait_for(lambda: any(r.get("step", 0) >= 100 for r in metrics(run)), timeout=120, what="step 100")


@dataclass
class Reference:
    run: Path
    log: str


@pytest.fixture(scope="module")
def reference(cluster, medium_data, tmp_path_factory) -> Reference:
    """One uninterrupted 2-node job: what the interrupted ones must end with."""
    tmp = tmp_path_factory.mktemp("slurm-hosts-reference")
    job = submit(cluster, tmp, medium_data, tmp / "run")
    return Reference(tmp / "run", follow(cluster, tmp, job))


def test_a_two_node_job_trains_across_hosts_as_on_one_host(reference, medium_data, tmp_path):
    log = reference.log
    assert "restart 0 on node[1-2]: 2 ranks" in log and "2 ranks on cpu; gradients averaged by gloo" in log, log
    assert summary(reference.run)["world_size"] == 2 and summary(reference.run)["epochs"] == 2
    one_host = tmp_path / "one-host"
    res = run_train(2, medium_data, one_host, *FLAGS)
    assert res.returncode == 0, res.stderr
    assert_same_params(reference.run, one_host)  # the same model as two ranks on one host


def test_a_scheduler_preemption_requeues_the_job_and_it_ends_with_the_same_model(
    cluster, reference, medium_data, tmp_path
):
    """A job in the higher-priority partition that needs both nodes whole: Slurm preempts ours (PreemptMode=
    REQUEUE: SIGTERM to the job), the ranks checkpoint, the job is requeued and resumes after it."""
    run = tmp_path / "run"
    job = submit(cluster, tmp_path, medium_data, run)
    past_step_100(run)
    high = cluster.run(["sbatch", "--parsable", "--partition=high", "--nodes=2", "--exclusive",
                        f"--output={tmp_path}/high-%j.out", "--wrap", "sleep 2"])
    assert high.returncode == 0, high.stderr
    log = follow(cluster, tmp_path, job)
    assert "stopped by SIGTERM" in log and "restart 1 on node[1-2]" in log and "resuming at epoch 1" in log, log
    assert (tmp_path / f"high-{high.stdout.strip()}.out").exists(), "the preempting job ran"
    assert_same_params(run, reference.run)


def ranks_on(host: Host) -> bool:
    """Whether a rank still runs on `host`: a process whose command line starts as srun starts a rank (the
    job's Python, `-m mnist_dist.train`), not one that merely mentions it."""
    return host.run(["pgrep", "-f", f"^{sys.executable} -m mnist_dist.train "]).returncode == 0


def test_a_node_cut_off_ends_the_job_in_bounded_time_and_the_requeue_finishes_after_mending(cluster, reference,
                                                                                            medium_data, tmp_path):
    run = tmp_path / "run"
    job = submit(cluster, tmp_path, medium_data, run)
    past_step_100(run)
    node2, bound = cluster.nodes[1], HANG + 60
    node2.cut()
    cut = time.monotonic()
    try:
        wait_for(
            lambda: "srun: error: node1: task 0: Exited with exit code 76" in slurm_log(tmp_path, job),
            timeout=bound,
            what="rank 0 on node1 to end",
        )
        rank0_s = time.monotonic() - cut
        wait_for(lambda: not ranks_on(node2), timeout=bound - rank0_s, what="rank 1 on node2 to end by itself")
        rank1_s = time.monotonic() - cut
        wait_for(
            lambda: "JobState=PENDING" in cluster.job(job), timeout=bound - rank1_s, what="Slurm to requeue the job"
        )
        requeued_s = time.monotonic() - cut
    finally:
        node2.mend()
    mended = time.monotonic()
    log = slurm_log(tmp_path, job)
    assert log.count("mnist-dist: error: no progress on any rank for") == 1 and "its network cut" in log, log
    assert "Traceback" not in log
    # rank 1's line cannot reach srun through the cut; its own post-mortem shows its watchdog ended it
    assert "host: node2" in next(run.glob("hangs/*/rank-1.txt")).read_text()
    log = follow(cluster, tmp_path, job)
    print(f"after the cut: rank 0 ended {rank0_s:.1f} s, rank 1 {rank1_s:.1f} s, job requeued {requeued_s:.1f} s; "
          f"finished {time.monotonic() - mended:.1f} s after mending")
    assert "restart 1 on node[1-2]" in log and "resuming at epoch 1" in log, log
    assert_same_params(run, reference.run)  # no checkpoint lost or half-written: the uninterrupted model
