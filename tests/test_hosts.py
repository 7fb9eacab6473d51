"""The job on separate hosts (tests/hosts.py: network namespaces with their own hostname, addresses,
/etc/hosts, /dev/shm and /tmp, joined by a virtual switch): rendezvous, run dirs, the 127.0.1.1 pitfall,
same-named hosts, a partition, a blip and elastic node loss. Skipped, with the reason, where namespaces
cannot be made."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import hosts as hosts_mod
from helpers import SMALL_RUN, job_env, metrics, run_train, summary, wait_for
from hosts import Host, Hosts
from mnist_dist.errors import EXIT_HUNG

WHY_NOT = hosts_mod.unavailable()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(WHY_NOT is not None, reason=f"separate hosts: {WHY_NOT}")]

PORT = 29500
FLAGS = (*SMALL_RUN, "--ckpt-every", "50", "--no-verify-data", "--no-download")


def torchrun(
    rdzv: str, node: int, *flags: str, nnodes: str = "2", endpoint: str = "nodeA", restarts: int = 0, nproc: int = 1
) -> list[str]:
    """The command each node runs, one rank per node, as the README says."""
    how = ([f"--node-rank={node}", f"--master-addr={endpoint}", f"--master-port={PORT}"] if rdzv == "static" else
           ["--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}:{PORT}", "--rdzv-id=hosts-test",
            "--rdzv-conf=join_timeout=60,last_call_timeout=2,close_timeout=5"])
    return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--nproc-per-node={nproc}", *how,
            f"--max-restarts={restarts}",
            "-m", "mnist_dist.train", *FLAGS, *flags]


def plain(rank: int, master: str, *flags: str) -> tuple[list[str], dict]:
    """One rank as a plain process with the launcher's variables (as srun or a scheduler would start it)."""
    env = job_env(RANK=str(rank), LOCAL_RANK="0", WORLD_SIZE="2", MASTER_ADDR=master, MASTER_PORT=str(PORT))
    return [sys.executable, "-m", "mnist_dist.train", *FLAGS, *flags], env


def finish(procs: list[subprocess.Popen], hosts: list[Host], timeout: float) -> list[tuple[int, str, str, float]]:
    """Wait for every node's command: (exit code, stdout, stderr, seconds from now) each; on a timeout every
    process on the hosts is killed and the test fails."""
    start, results = time.monotonic(), []
    for proc, host in zip(procs, hosts, strict=False):  # hosts may outnumber procs: all are killed on a timeout
        try:
            out, err = proc.communicate(timeout=max(1.0, timeout - (time.monotonic() - start)))
        except subprocess.TimeoutExpired:
            for h in hosts:
                h.kill_all()
            out, err = proc.communicate()
            pytest.fail(f"{host.name}'s command still ran after {timeout:.0f} s:\n{err[-3000:]}")
        results.append((proc.returncode, out, err, time.monotonic() - start))
    return results


def local(host: Host, path: str) -> Path:
    """A path on `host` (its own /tmp included), as seen from the test."""
    return Path(f"/proc/{host.pid}/root{path}")


def newest_step(run: Path) -> int:
    ckpts = sorted((run / "checkpoints").glob("ckpt-*.pt"))
    return int(ckpts[-1].stem.split("-")[1]) if ckpts else 0


def final_params(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(sorted((run / "checkpoints").glob("ckpt-*.pt"))[-1], weights_only=True)["model"]


def same_model(run: Path, reference: Path) -> bool:
    p, q = final_params(run), final_params(reference)
    return p.keys() == q.keys() and all(torch.equal(p[k], q[k]) for k in p)


def said(err: str) -> str:
    """The job's lines and torchrun's log lines of a node's stderr (no tracebacks)."""
    return "\n".join(line[:300] for line in err.splitlines() if line.startswith(("mnist-dist", "W1", "E1", "I1")))


def one_line_errors(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("mnist-dist: error:")]


@pytest.fixture(scope="module")
def reference(small_data, tmp_path_factory) -> Path:
    """The same job on one host, 2 ranks, uninterrupted: what the separate hosts must reproduce."""
    run = tmp_path_factory.mktemp("one-host") / "run"
    res = run_train(2, small_data, run, *SMALL_RUN, "--ckpt-every", "50", "--epochs", "2")
    assert res.returncode == 0, res.stderr
    return run


# --- 1. rendezvous and run dirs -------------------------------------------------------------------
@pytest.mark.parametrize("rdzv,run_dir", [("static", "node-local"), ("c10d", "shared")])
def test_two_hosts_train_stop_and_resume_to_the_one_host_model(rdzv, run_dir, reference, small_data, tmp_path):
    """Stopped by SIGTERM to both agents (as scancel does) mid-run, then the same command again on each node:
    the final model is bit for bit the one-host run's."""
    run = "/tmp/run" if run_dir == "node-local" else str(tmp_path / "run")
    flags = ("--data-dir", str(small_data), "--run-dir", run, "--epochs", "2")
    with Hosts(tmp_path, ["nodeA", "nodeB"]) as hosts:
        rank0_run = local(hosts[0], run) if run_dir == "node-local" else Path(run)
        procs = [h.start(torchrun(rdzv, i, *flags), env=job_env()) for i, h in enumerate(hosts)]
        wait_for(lambda: newest_step(rank0_run) >= 100 or procs[0].poll() is not None, timeout=120, what="step 100")
        for host in hosts:  # to torchrun's agent (nsenter, which started it, does not pass signals on)
            host.run(["pkill", "-TERM", "-f", "torch.distributed.run"])
        stopped = finish(procs, hosts, timeout=60)
        assert all(code != 0 for code, *_ in stopped), "a stopped run does not report success"
        # the node whose rank got the signal first names it; the other "a signal to another rank"
        assert "mnist-dist: stopped by SIG" in stopped[0][2] + stopped[1][2] and \
            all("mnist-dist: stopped by " in err for _, _, err, _ in stopped), \
            f"each node's log says why it stopped:\nA: {said(stopped[0][2])}\nB: {said(stopped[1][2])}"
        procs = [h.start(torchrun(rdzv, i, *flags), env=job_env()) for i, h in enumerate(hosts)]
        done = finish(procs, hosts, timeout=120)
        assert [code for code, *_ in done] == [0, 0], done[0][2][-2000:] + done[1][2][-2000:]
        assert "resuming at epoch" in done[0][1]
        assert same_model(rank0_run, reference), "the resumed two-host run ends with the one-host model"


# --- 2. the 127.0.1.1 pitfall and start-up failures -----------------------------------------------
@pytest.mark.parametrize("loopback,subnet", [((0,), "10.7.0"), ((0,), "198.18.0"), ((1,), "198.18.0"),
                                             ((0, 1), "10.7.0"), ((0, 1), "198.18.0")],
                         ids=["A-low", "A-high", "B-high", "both-low", "both-high"])
def test_a_host_name_on_127_0_1_1_just_works(loopback, subnet, small_data, tmp_path):
    """Debian's /etc/hosts maps the host's own name to 127.0.1.1. Left alone, gloo offers that address to the
    other host; the job points gloo (and NCCL) at the interface that reaches the other host instead."""
    flags = ("--data-dir", str(small_data), "--run-dir", "/tmp/run", "--epochs", "1")
    with Hosts(tmp_path, ["nodeA", "nodeB"], subnet=subnet, loopback_name=loopback) as hosts:
        procs = [h.start(torchrun("static", i, *flags), env=job_env()) for i, h in enumerate(hosts)]
        results = finish(procs, hosts, timeout=120)
    assert [code for code, *_ in results] == [0, 0], results[0][2][-2000:] + results[1][2][-2000:]
    assert "test accuracy" in results[0][1]


def test_the_interface_chosen_for_gloo_and_nccl_is_the_one_routing_to_the_other_host(tmp_path):
    """What the job sets before gloo or NCCL starts (no GPU here: NCCL reads the same variable): eth0 on
    both hosts, whatever their names resolve to; a value the user set is kept; on one host, nothing."""
    script = [sys.executable, str(Path(__file__).parent / "scripts" / "choose_interface.py")]
    with Hosts(tmp_path, ["nodeA", "nodeB"], subnet="198.18.0", loopback_name=(0, 1)) as (a, b):
        procs = [a.start([*script, "0", f"nodeA:{PORT}"], env=job_env()),
                 b.start([*script, "1", f"nodeA:{PORT}", "NCCL_SOCKET_IFNAME=ib0"], env=job_env())]
        (code_a, out_a, err_a, _), (code_b, out_b, err_b, _) = finish(procs, [a, b], timeout=60)
        one_host = [a.start([*script, str(rank), f"127.0.0.1:{PORT + 1}"], env=job_env()) for rank in (0, 1)]
        alone = finish(one_host, [a, a], timeout=60)
    assert code_a == code_b == 0, err_a + err_b
    assert json.loads(out_a) == {"GLOO_SOCKET_IFNAME": "eth0", "NCCL_SOCKET_IFNAME": "eth0"}
    assert json.loads(out_b) == {"GLOO_SOCKET_IFNAME": "eth0", "NCCL_SOCKET_IFNAME": "ib0"}  # the user's, kept
    assert all(code == 0 and json.loads(out) == {"GLOO_SOCKET_IFNAME": None, "NCCL_SOCKET_IFNAME": None}
               for code, out, _, _ in alone)


def test_a_slow_link_is_said_once_with_its_rate_and_interface(small_data, tmp_path):
    """Two hosts joined by a 40 Mbit/s link (htb, both ways), one rank each: rank 0 says once that the job
    is communication-bound, at a bus rate within 2x of the link's 5 MB/s, over eth0; nobody is named slow."""
    run = tmp_path / "run"
    flags = ("--data-dir", str(small_data), "--run-dir", str(run), "--epochs", "2", "--batch-size", "64",
             "--log-every", "4")
    with Hosts(tmp_path, ["nodeA", "nodeB"]) as hosts:
        for host in hosts:
            host.limit("40mbit")
        procs = [h.start(torchrun("static", i, *flags), env=job_env()) for i, h in enumerate(hosts)]
        results = finish(procs, hosts, timeout=120)
    assert [code for code, *_ in results] == [0, 0], results[0][2][-2000:] + results[1][2][-2000:]
    said_a, said_b = said(results[0][2]), said(results[1][2])
    lines = [line for line in said_a.splitlines() if "communication-bound:" in line]
    assert len(lines) == 1 and lines[0].startswith("mnist-dist: note: communication-bound: "), said_a
    rate = float(re.search(r"at ([\d.]+) MB/s over eth0", lines[0])[1])
    assert 2.5 <= rate <= 10, lines[0]
    assert "slower than the median" not in said_a + said_b and "communication-bound" not in said_b
    [event] = [r for r in metrics(run) if r.get("event") == "communication_bound"]
    assert event["link"] == "eth0" and event["bus_mb_per_s"] == pytest.approx(rate, abs=0.05)


def sent_bytes(host: Host) -> int:
    """What the host's cable (eth0) has sent so far: its own network namespace's /proc/net/dev."""
    line = next(line for line in host.sh("cat /proc/net/dev").splitlines() if line.strip().startswith("eth0:"))
    return int(line.split(":")[1].split()[8])


def test_exact_on_two_hosts_of_two_ranks_has_one_processs_bits_and_sends_one_row_a_step(small_data, tmp_path):
    """--exact on 2 hosts x 2 ranks (no shared memory across hosts: gloo among all four) ends with the
    one-process run's weights. Counted on the veths: each host's cable carries about one row of partial
    sums per step (each rank sends its sibling on the other host half a row in the reduce-scatter and
    half in the all-gather); gathering the partial sums, as before, sent three."""
    flags = ("--exact", "--pieces", "8", "--batch-size", "16", "--epochs", "1", "--log-every", "64", "--seed", "5")
    one = tmp_path / "one"
    assert run_train(1, small_data, one, *flags).returncode == 0
    with Hosts(tmp_path, ["nodeA", "nodeB"]) as hosts:
        before = [sent_bytes(h) for h in hosts]
        procs = [h.start(torchrun("static", i, "--data-dir", str(small_data), "--run-dir", "/tmp/run", *flags, nproc=2),
                         env=job_env()) for i, h in enumerate(hosts)]
        results = finish(procs, hosts, timeout=180)
        sent = [sent_bytes(h) - b for h, b in zip(hosts, before, strict=True)]
        run = local(hosts[0], "/tmp/run")
        assert [code for code, *_ in results] == [0, 0], results[0][2][-2000:] + results[1][2][-2000:]
        assert summary(run)["fingerprint"] == summary(one)["fingerprint"]
        steps, row = summary(run)["steps"], (784 * 128 + 128 + 128 * 10 + 10 + 1) * 4  # the gradient and the loss
    assert "reduce-scattered and all-gathered" in results[0][1], results[0][1]
    assert all(0.95 <= s / (steps * row) <= 1.2 for s in sent), [s / (steps * row) for s in sent]


def test_powersgd_between_two_hosts_sends_what_it_says(small_data, tmp_path):
    """--grad-compression powersgd, one rank on each of two hosts: per step, the cables carry at least what the
    start-up line says a step sends (9 kB) and less than a tenth of the whole gradient's 407 kB (on top of
    the 9 kB: the packets' headers, three all_reduces a step, and once per run DDP's broadcast of the
    weights, the two plain steps and the epoch end's gather of the state for the checkpoint)."""
    flags = ("--data-dir", str(small_data), "--run-dir", "/tmp/run", "--epochs", "1", "--log-every", "64",
             "--grad-compression", "powersgd", "--powersgd-start", "2", "--ckpt-every", "0")
    with Hosts(tmp_path, ["nodeA", "nodeB"]) as hosts:
        before = [sent_bytes(h) for h in hosts]
        procs = [h.start(torchrun("static", i, *flags), env=job_env()) for i, h in enumerate(hosts)]
        results = finish(procs, hosts, timeout=120)
        sent = [sent_bytes(h) - b for h, b in zip(hosts, before, strict=True)]
        steps = summary(local(hosts[0], "/tmp/run"))["steps"]
    assert [code for code, *_ in results] == [0, 0], results[0][2][-2000:] + results[1][2][-2000:]
    said = re.search(r"PowerSGD rank 2 from step 2 \(([\d.]+) kB a step", results[0][1])
    assert said, results[0][1]
    per_step = [s / steps for s in sent]
    row = (784 * 128 + 128 + 128 * 10 + 10) * 4
    assert all(float(said[1]) * 1e3 <= b <= row / 10 for b in per_step), (said[0], per_step)


@pytest.mark.parametrize("wrong", [0, 1], ids=["on-A", "on-B"])
def test_a_start_up_failure_ends_every_host_in_one_line_within_seconds(wrong, small_data, tmp_path):
    """GLOO_SOCKET_IFNAME=lo on one host (the user's choice is kept): its peer is offered a loopback
    address. Both hosts end in one line each, naming the host, the address and the fix; no traceback."""
    flags = ("--data-dir", str(small_data), "--run-dir", "/tmp/run", "--epochs", "1")
    with Hosts(tmp_path, ["nodeA", "nodeB"], subnet="198.18.0", loopback_name=(0, 1)) as hosts:
        procs = []
        for rank, host in enumerate(hosts):
            cmd, env = plain(rank, "nodeA", *flags)
            if rank == wrong:
                env["GLOO_SOCKET_IFNAME"] = "lo"
            procs.append(host.start(cmd, env=env))
        results = finish(procs, hosts, timeout=60)
    for code, _, err, took in results:
        assert code == 1 and took < 60, err
        lines = one_line_errors(err)
        assert len(lines) == 1 and "Traceback" not in err, err
    said = " ".join(one_line_errors(results[0][2]) + one_line_errors(results[1][2]))
    assert "could not join the process group" in said and "127.0.0.1" in said and "GLOO_SOCKET_IFNAME" in said
    assert "on nodeA" in said or "on nodeB" in said


@pytest.mark.parametrize("alone", [0, 1], ids=["rank-0-alone", "rank-1-alone"])
def test_a_peer_that_never_comes_ends_the_other_at_the_start_up_limit(alone, small_data, tmp_path):
    """Only one of two ranks starts (its peer's host never launched it): it ends at --start-timeout in
    one line, rank 0 naming the rank it never saw, rank 1 the store it could not reach."""
    cmd, env = plain(alone, "nodeA", "--data-dir", str(small_data), "--run-dir", "/tmp/run", "--start-timeout", "10")
    with Hosts(tmp_path, ["nodeA", "nodeB"]) as hosts:
        [(code, _, err, took)] = finish([hosts[alone].start(cmd, env=env)], [hosts[alone]], timeout=60)
    lines = one_line_errors(err)
    assert code == 1 and 10 <= took < 40 and len(lines) == 1 and "Traceback" not in err, err
    assert ("rank(s) [1] never reached the store at nodeA:" in lines[0] if alone == 0 else
            "rank 1 on nodeB could not reach the job's rendezvous store at nodeA:" in lines[0]), lines[0]


# --- 2b. two hosts with one hostname --------------------------------------------------------------
def test_same_named_hosts_kill_nothing_on_the_wrong_host(medium_data, tmp_path):
    """Both hosts are called "node" and their pids overlap: host A runs a bystander with the very pid that
    rank 1 has on host B. Rank 1 is stopped; rank 0's watchdog ends the job (exit 76) and signals nothing,
    since no stopped rank is proven to run on its host."""
    flags = (
        "--data-dir", str(medium_data), "--run-dir", str(tmp_path / "run"), "--epochs", "20", "--hang-timeout", "6",
    )
    with Hosts(tmp_path, ["node", "node"], aliases={"master": 0}) as (a, b):
        for _ in range(5):  # B's pids run ahead of A's, so that rank 1's pid is still free on A
            b.sh("true")
        cmd, env = plain(1, "master", *flags)
        rank1 = b.start(cmd, env=env)
        inner = b.pid_of(rank1)  # rank 1 itself, as host B numbers it
        bystander = a.start(["sh", "-c", f"echo {inner - 1} > /proc/sys/kernel/ns_last_pid; sleep 600 & echo $!; wait"])
        assert int(bystander.stdout.readline()) == inner, "the bystander did not get rank 1's pid"
        cmd, env = plain(0, "master", *flags)
        rank0 = a.start(cmd, env=env)
        wait_for(lambda: newest_step(tmp_path / "run") >= 50 or rank0.poll() is not None, timeout=120, what="step 50")
        assert rank1.poll() is None, rank1.communicate()
        b.sh(f"kill -STOP {inner}")
        [(code, _, err, took)] = finish([rank0], [a, b], timeout=60)
        assert code == EXIT_HUNG, err
        assert f"rank 1 (pid {inner} on node)" in err
        assert bystander.poll() is None, "the bystander on host A, with rank 1's pid, was killed"
        assert rank1.poll() is None, "rank 1 on host B is stopped, not killed from another host"


# --- 3. a partition, 4. a blip --------------------------------------------------------------------
def test_a_partitioned_node_ends_every_node_and_the_rerun_finishes(medium_data, tmp_path):
    """c10d rendezvous (torchrun's agent on node A serves the store), node B's cable cut for good mid-run:
    each node ends within --hang-timeout + 60 s with one line; node B's agent, which would block on its
    store for ~15 minutes, is ended by its rank (137). After mending, the same commands resume and finish."""
    hang = 10
    flags = ("--data-dir", str(medium_data), "--run-dir", "/tmp/run", "--epochs", "2", "--hang-timeout", str(hang))
    with Hosts(tmp_path, ["nodeA", "nodeB"]) as hosts:
        a, b = hosts
        procs = [h.start(torchrun("c10d", i, *flags), env=job_env()) for i, h in enumerate(hosts)]
        wait_for(lambda: newest_step(local(a, "/tmp/run")) >= 100 or procs[0].poll() is not None, timeout=120,
                 what="step 100")
        b.cut()
        results = finish(procs, hosts, timeout=hang + 60)
        took = [r[3] for r in results]  # seconds after the cut
        print(f"partition: node A ended {took[0]:.1f} s after the cut (exit {results[0][0]}), "
              f"node B {took[1]:.1f} s (exit {results[1][0]})")
        (code_a, _, err_a, _), (code_b, _, err_b, _) = results
        assert code_a == 1 and "exitcode  : 76" in err_a, err_a[-3000:]  # torchrun's report of its rank's 76
        assert code_b in (137, -9), err_b[-3000:]
        for err in (err_a, err_b):
            assert len([line for line in one_line_errors(err) if "no progress on any rank" in line]) == 1, err[-3000:]
        assert "network" in err_a and "network to it is cut" in err_b
        saved = newest_step(local(a, "/tmp/run"))
        torch.load(sorted((local(a, "/tmp/run") / "checkpoints").glob("ckpt-*.pt"))[-1], weights_only=True)
        b.mend()
        procs = [h.start(torchrun("c10d", i, *flags), env=job_env()) for i, h in enumerate(hosts)]
        done = finish(procs, hosts, timeout=180)
        assert [code for code, *_ in done] == [0, 0], done[0][2][-2000:] + done[1][2][-2000:]
        assert f"(step {saved})" in done[0][1], "the rerun resumes from the newest checkpoint"


def test_a_short_blip_is_survived_and_ends_as_an_uninterrupted_run(reference, small_data, tmp_path):
    """Node B's cable out for 3 s (below --hang-timeout): TCP retransmits, and the job ends with the one-host
    model bit for bit."""
    flags = ("--data-dir", str(small_data), "--run-dir", str(tmp_path / "run"), "--epochs", "2", "--hang-timeout", "30")
    with Hosts(tmp_path, ["nodeA", "nodeB"]) as hosts:
        procs = [h.start(torchrun("static", i, *flags), env=job_env()) for i, h in enumerate(hosts)]
        wait_for(lambda: newest_step(tmp_path / "run") >= 100 or procs[0].poll() is not None, timeout=120,
                 what="step 100")
        hosts[1].cut()
        time.sleep(3)
        hosts[1].mend()
        results = finish(procs, hosts, timeout=120)
    assert [code for code, *_ in results] == [0, 0], results[0][2][-2000:] + results[1][2][-2000:]
    assert same_model(tmp_path / "run", reference)


# --- 5. elastic: node-local run dirs, the rendezvous store on a third host -----------------------
STORE = ("import time, datetime, torch.distributed as d; "
         f"s = d.TCPStore('0.0.0.0', {PORT}, is_master=True, wait_for_workers=False, "
         "timeout=datetime.timedelta(seconds=600)); print('serving', flush=True); time.sleep(3600)")
ELASTIC = ("--run-dir", "/tmp/run", "--epochs", "3", "--hang-timeout", "10")


def rendezvous_host(host: Host) -> subprocess.Popen:
    server = host.start([sys.executable, "-c", STORE])
    assert server.stdout.readline().strip() == "serving"
    return server


def test_elastic_goes_on_without_a_lost_node_and_says_its_checkpoints_went_with_it(medium_data, tmp_path):
    """--nnodes=1:2, c10d at a third host: rank 0's node (the one with checkpoints) is lost for good; the
    other goes on alone at world size 1 and finishes, saying in one line that the job had saved a newer
    checkpoint on the lost node than any it holds."""
    cmd = torchrun("c10d", 0, "--data-dir", str(medium_data), *ELASTIC, nnodes="1:2", endpoint="store", restarts=3)
    with Hosts(tmp_path, ["nodeA", "nodeB", "store"]) as (a, b, store):
        rendezvous_host(store)
        procs = {a: a.start(cmd, env=job_env()), b: b.start(cmd, env=job_env())}
        wait_for(lambda: max(newest_step(local(h, "/tmp/run")) for h in (a, b)) >= 100, timeout=120, what="step 100")
        lost = a if newest_step(local(a, "/tmp/run")) else b
        survivor = b if lost is a else a
        saved = newest_step(local(lost, "/tmp/run"))
        lost.cut()
        lost.kill_all()
        [(code, out, err, took)] = finish([procs[survivor]], [a, b, store], timeout=150)
    print(f"elastic: {survivor.name} finished alone {took:.1f} s after {lost.name} was lost (exit {code})")
    assert code == 0, said(err)
    assert "1 rank on cpu" in out and "test accuracy" in out
    assert f"warning: this job saved a checkpoint at step {saved} on {lost.name}" in err, said(err)
