"""`mnist-dist doctor`: its verdicts on made-up facts, alone on this node, and started like the job on two
namespace hosts (tests/hosts.py): node-local run dirs, a shared one, an htb-limited link. The Slurm and
submitit paths: test_slurm.py, test_launchers.py."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

import hosts as hosts_mod
from helpers import ROOT, job_env
from hosts import Hosts
from mnist_dist.doctor import clock_offset, problems
from test_hosts import PORT, finish

DOCTOR = [sys.executable, "-m", "mnist_dist.cli", "doctor"]
# the namespace "hosts" share this machine's two cores with each other and the rest of the suite: their
# compute probes differ by up to 2x without anything wrong (a slow node is named in the made-up-facts test)
SHARED_CORES = ("--slow-factor", "4")


def facts(rank: int, host: str, **changed) -> dict:
    base = {"rank": rank, "host": host, "python": "3.11.7", "torch": "2.14.1", "cuda": "13.0", "nccl": "",
            "gloo": True, "cpu": "x", "isa": ["avx2"], "mem_free_gb": 20.0, "disk_free_gb": 50.0, "interface": "eth0",
            "address": "10.0.0.1", "data": "", "data_verified": True, "run_dir_writable": True,
            "compute_gflops": 100.0, "gpu": {}}
    return {**base, **changed}


def link(a: int, b: int, mb_per_s: float = 100.0, offset: float = 0.0, bound: float = 0.001) -> dict:
    return {"pair": [a, b], "latency_ms": 0.1, "mb_per_s": mb_per_s, "clock_offset_s": offset, "clock_bound_s": bound}


def test_a_clock_offset_is_the_peers_reading_against_the_round_trips_middle():
    """The peer's clock 2 s ahead, 10 ms each way: +2.0 s, give or take 10 ms; a slower way back widens the
    bound, not the estimate's arithmetic."""
    assert clock_offset(100.000, 102.010, 100.020) == pytest.approx((2.0, 0.010))
    offset, bound = clock_offset(100.000, 97.510, 100.030)  # 2.5 s behind, the reply took 20 ms
    assert offset == pytest.approx(-2.505) and bound == pytest.approx(0.015)


def test_each_problem_is_one_line_naming_the_node():
    nodes = {"a": [0, 1], "b": [2, 3], "c": [4, 5]}
    ranks = [facts(r, h) for h, rs in nodes.items() for r in rs]
    seen = {h: list(nodes) for h in nodes}
    links = [link(0, 2), link(0, 4), link(2, 4)]
    assert problems(ranks, nodes, seen, links) == []
    ranks[2]["torch"] = ranks[3]["torch"] = "2.9.0"
    ranks[5]["compute_gflops"] = ranks[4]["compute_gflops"] = 40.0
    ranks[1]["data"] = "MNIST file train-images-idx3-ubyte is missing in /d/MNIST/raw: ..."
    seen["c"] = ["c"]
    links = [link(0, 2, offset=3.0), link(0, 4), link(2, 4, mb_per_s=30.0)]
    found = problems(ranks, nodes, seen, links)
    assert found == [
        "torch differs between nodes: a 2.14.1, b 2.9.0, c 2.14.1",
        "rank 1 on a: MNIST file train-images-idx3-ubyte is missing in /d/MNIST/raw: ...",
        "the run dir on c is not the one on a, b (a node-local folder?): give every node the same shared run dir, "
        "or a lost node takes its checkpoints with it",
        "c computes 2.5x slower than the median node (40 GFLOP/s vs 100)",
        "the clock of b is +3.0 s off a's: run NTP (chrony) on every node",
        "the link b - c moves 30.0 MB/s, under half the best pair's 100.0",
    ]


def test_alone_it_checks_this_node_and_says_what_it_cannot(tiny_data, tmp_path):
    res = subprocess.run([*DOCTOR, "--data-dir", str(tiny_data), "--run-dir", str(tmp_path / "run"),
                          "--no-verify-data", "--json"], cwd=ROOT, env=job_env(), capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["problems"] == [] and "no other node" in report["not_checked"]
    [me] = report["ranks"]
    assert me["run_dir_writable"] and me["compute_gflops"] > 0 and me["torch"].startswith("2.")
    bad = subprocess.run([*DOCTOR, "--data-dir", str(tmp_path / "nothing"), "--run-dir", str(tmp_path / "run")],
                         cwd=ROOT, env=job_env(), capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "node " in bad.stdout
    [line] = bad.stderr.splitlines()
    assert line.startswith("mnist-dist: error: rank 0 on ") and "is missing in" in line


@pytest.mark.slow
@pytest.mark.skipif(hosts_mod.unavailable() is not None, reason=f"separate hosts: {hosts_mod.unavailable()}")
@pytest.mark.parametrize("run_dir", ["node-local", "shared"])
def test_two_hosts_started_like_the_job(run_dir, tiny_data, tmp_path):
    """torchrun on two hosts joined by a 40 Mbit/s link (htb, both ways): a run dir that is each host's own
    /tmp is named, exit 1 on both nodes; a shared one passes, exit 0. Either way the table gives the link's
    rate within 2x of its 5 MB/s, the interface each node uses and both nodes' clocks."""
    run = "/tmp/run" if run_dir == "node-local" else str(tmp_path / "run")
    with Hosts(tmp_path, ["nodeA", "nodeB"]) as hosts:
        for host in hosts:
            host.limit("40mbit")
        procs = [h.start([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={i}",
                          "--nproc-per-node=1", "--master-addr=nodeA", f"--master-port={PORT}", "-m",
                          "mnist_dist.doctor", "--data-dir", str(tiny_data), "--run-dir", run, "--no-verify-data",
                          "--probe-mb", "2", *SHARED_CORES], env=job_env()) for i, h in enumerate(hosts)]
        (code_a, out, err, took), (code_b, *_) = finish(procs, hosts, timeout=120)
    said = [line for line in err.splitlines() if line.startswith("mnist-dist")]
    assert "node nodeA (ranks 0)" in out and "node nodeB (ranks 1)" in out and "interface eth0 10.7.0." in out
    rate = float(re.search(r"link nodeA - nodeB: [\d.]+ ms, ([\d.]+) MB/s; clock of nodeB [+-]", out)[1])
    assert 2.5 <= rate <= 10, out
    if run_dir == "shared":
        assert code_a == code_b == 0 and "all well" in out, err[-2000:]
    else:
        assert code_a != 0 and code_b != 0, err[-2000:]
        assert said == ["mnist-dist: error: the run dir on nodeA is not the one on nodeB (a node-local folder?): give "
                        "every node the same shared run dir, or a lost node takes its checkpoints with it",
                        "mnist-dist: error: the run dir on nodeB is not the one on nodeA (a node-local folder?): give "
                        "every node the same shared run dir, or a lost node takes its checkpoints with it"], err[-2000:]
    assert took < 60
    print(out)


def test_a_gpu_node_reports_its_gpu_and_matmul_probe(monkeypatch):
    """No GPU here: fake ones (tests/fakes.py), and the probe's timing stands in for the product."""
    import fakes
    from mnist_dist import doctor

    monkeypatch.setattr(doctor, "compute_probe", lambda device, n=512, window_s=0.25: 400_000.0 if n == 4096 else 1.0)
    with fakes.fake_cuda(2):
        gpu = doctor.gpu_facts(torch.device("cuda", 1))
    assert gpu["name"] == "Fake GPU" and gpu["memory_gb"] == 80.0 and gpu["matmul_tflops"] == 400.0
    assert doctor.gpu_facts(torch.device("cpu")) == {}
    ranks = [facts(0, "a", gpu=gpu)]
    assert "  gpu Fake GPU, 80.0 GB, driver " in doctor.table(ranks, {"a": [0]}, [], 0.0)
