"""`mnist-dist doctor`: check the nodes before a job, started exactly like the job.

    torchrun --nnodes=2 --nproc-per-node=1 --rdzv-backend=c10d --rdzv-endpoint=nodeA:29400 \
        --no-python mnist-dist doctor --data-dir D --run-dir R
    DOCTOR=1 sbatch slurm/train.sbatch           # as the job's first step: no training on a bad node set
    python launch/submit.py --doctor -- --data-dir D --run-dir R
    mnist-dist doctor --data-dir D --run-dir R   # alone: this node only

Every rank gathers what it sees (versions, CPU, GPUs, memory, disk, data, the interface it uses, a
compute probe); each node's first rank writes a token into the run dir and looks for every other
node's (a node-local run dir is named); rank 0 measures its clock against each node's, and the link
between every pair of nodes (latency, MB/s), and the all_reduce bus bandwidth of all ranks. One table
per node, then one line per problem (exit 1) or that all is well (exit 0); --json for scripts.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import socket
import statistics
import sys
import time
import uuid
from pathlib import Path

import torch
import torch.distributed as dist

from . import data, devices, distributed
from .distributed import all_gather_json
from .errors import UsageError, first_line


MAX_SKEW_S = 1.0    # clocks further apart than this are a problem (post-mortems, metrics disagree)
MIN_DISK_GB = 1.0


# --- what one rank sees ---------------------------------------------------------------------------------
def local_facts(args: argparse.Namespace, device: torch.device, rank: int) -> dict:
    facts = {
        "rank": rank, "host": socket.gethostname(), "python": platform.python_version(), "torch": torch.__version__,
        "cuda": torch.version.cuda or "", "gloo": dist.is_gloo_available(), "cpu": cpu_model(),
        "isa": [f for f in ("avx2", "avx512f", "amx_tile") if f in cpu_flags()],
        "mem_free_gb": round(mem_available_gb(), 1), "disk_free_gb": round(disk_free_gb(args.run_dir), 1),
        "interface": os.environ.get("GLOO_SOCKET_IFNAME", ""), "address": address_of(),
        "data": data.file_problem(args.data_dir, args.verify_data) or "", "data_verified": args.verify_data,
        "run_dir_writable": writable(args.run_dir),
        "compute_gflops": round(compute_probe(device), 1), "gpu": gpu_facts(device),
    }
    facts["nccl"] = ".".join(map(str, torch.cuda.nccl.version())) if device.type == "cuda" else ""
    return facts


def proc_field(path: str, key: str) -> str | None:
    """The value of the first `key: value` line of a /proc file (None: no such file or line)."""
    for line in Path(path).read_text().splitlines() if Path(path).exists() else []:
        if line.split(":", 1)[0].strip() == key:
            return line.split(":", 1)[1].strip()
    return None


def cpu_model() -> str:
    return proc_field("/proc/cpuinfo", "model name") or platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    return set((proc_field("/proc/cpuinfo", "flags") or "").split())


def mem_available_gb() -> float:
    kb = proc_field("/proc/meminfo", "MemAvailable")
    return int(kb.split()[0]) / 2**20 if kb else float("nan")


def disk_free_gb(path: str) -> float:
    p = Path(path).resolve()
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free / 2**30


def address_of() -> str:
    addrs = distributed.interface_addresses()
    return addrs.get(os.environ.get("GLOO_SOCKET_IFNAME", ""), "")


def writable(run_dir: str) -> bool:
    try:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        probe = Path(run_dir) / f".doctor-{uuid.uuid4().hex}"
        probe.write_text("ok")
        probe.unlink()
        return True
    except OSError:
        return False


def compute_probe(device: torch.device, n: int = 512, window_s: float = 0.25) -> float:
    """GFLOP/s of n x n float32 matmuls here, sustained over `window_s` seconds (after one to warm up): a
    slow, throttled or busy node shows."""
    a = torch.randn(n, n, device=device)
    (a @ a).sum().item()
    done, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < window_s or done < 2:
        (a @ a).sum().item()  # host sync: the product is done
        done += 1
    return 2 * n**3 * done / elapsed / 1e9


def gpu_facts(device: torch.device) -> dict:
    if device.type != "cuda":
        return {}
    props = torch.cuda.get_device_properties(device)
    return {"name": props.name, "memory_gb": round(props.total_memory / 2**30, 1),
            "driver": nvidia_driver(), "matmul_tflops": round(compute_probe(device, n=4096) / 1000, 1)}


def nvidia_driver() -> str:
    path = Path("/proc/driver/nvidia/version")
    if path.exists():
        words = path.read_text().split()
        return next((w for w in words if w[:1].isdigit() and "." in w), "")
    return ""


# --- across the ranks -----------------------------------------------------------------------------------
def shared_run_dir(run_dir: str, me: dict, leaders: list[int], rank: int, group) -> list[str]:
    """Each node's first rank writes a token into the run dir; each then looks for every other node's.
    Returns the hosts whose tokens this node could see (on every rank; [] on ranks that are not leaders)."""
    folder, token = Path(run_dir) / ".doctor", f"{me['host']}-{uuid.uuid4().hex[:8]}"
    mine = folder / token
    if rank in leaders:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            mine.write_text(me["host"])
        except OSError:
            pass
    tokens = all_gather_json(token if rank in leaders else "", dist.get_world_size(group), group)
    seen = [t.rsplit("-", 1)[0] for t in tokens if t and (folder / t).exists()] if rank in leaders else []
    dist.barrier(group=group)  # everyone has looked
    if rank in leaders:
        mine.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # another node's token is still there
            folder.rmdir()
    return seen


def clock_offset(t0_send: float, t_peer: float, t0_recv: float) -> tuple[float, float]:
    """The peer's clock minus ours, from one round trip (NTP's estimate: the peer read its clock halfway),
    and the error bound (half the round trip)."""
    return t_peer - (t0_send + t0_recv) / 2, (t0_recv - t0_send) / 2


def measure_pairs(leaders: list[int], rank: int, group, mb: float) -> list[dict]:
    """Rank 0 against each other node's leader: clock offset; then every pair of node leaders: latency
    (half the best round trip of a small message) and MB/s (a message of `mb` MB there and back)."""
    results = []
    tiny, big = torch.zeros(1, dtype=torch.float64), torch.zeros(int(mb * 2**20) // 4)
    for i, a in enumerate(leaders):
        for b in leaders[i + 1:]:
            if rank not in (a, b):
                continue
            peer = b if rank == a else a
            best_rtt, offset, bound = float("inf"), 0.0, 0.0
            for _ in range(5):
                if rank == a:
                    start = time.time()
                    dist.send(tiny, peer, group=group)
                    dist.recv(tiny, peer, group=group)
                    end = time.time()
                    if end - start < best_rtt:
                        best_rtt = end - start
                        offset, bound = clock_offset(start, tiny.item(), end)
                else:
                    dist.recv(tiny, peer, group=group)
                    tiny.fill_(time.time())
                    dist.send(tiny, peer, group=group)
            start = time.perf_counter()
            if rank == a:
                dist.send(big, peer, group=group)
                dist.recv(tiny, peer, group=group)
            else:
                dist.recv(big, peer, group=group)
                dist.send(tiny, peer, group=group)
            seconds = time.perf_counter() - start
            if rank == a:
                results.append({"pair": [a, b], "latency_ms": round(best_rtt / 2 * 1000, 3),
                                "mb_per_s": round(big.numel() * 4 / 1e6 / seconds, 1),
                                "clock_offset_s": round(offset, 4), "clock_bound_s": round(bound, 4)})
    return results


def allreduce_busbw(world_size: int, device: torch.device, mb: float) -> float:
    """all_reduce bus bandwidth of every rank, MB/s (nccl-tests: algbw x 2(n-1)/n)."""
    t = torch.ones(int(mb * 2**20) // 4, device=device)
    dist.all_reduce(t)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    dist.all_reduce(t)
    t[:1].item()
    seconds = time.perf_counter() - start
    return t.numel() * 4 / 1e6 / seconds * 2 * (world_size - 1) / world_size


# --- the verdict ----------------------------------------------------------------------------------------
def problems(ranks: list[dict], nodes: dict[str, list[int]], seen: dict[str, list[str]], pairs: list[dict],
             slow: float = 1.5) -> list[str]:
    """One line per problem, from every rank's facts, which node leaders saw which tokens, and the pairs;
    a node whose compute probe is `slow` times under the median node's is named."""
    found = []
    for key in ("python", "torch", "cuda", "nccl"):
        values = {r[key] for r in ranks}
        if len(values) > 1:
            found.append(f"{key} differs between nodes: " + ", ".join(
                f"{host} {ranks[rs[0]][key] or 'none'}" for host, rs in nodes.items()))
    for r in ranks:
        where = f"rank {r['rank']} on {r['host']}"
        if r["data"]:
            found.append(f"{where}: {r['data']}")
        if not r["run_dir_writable"]:
            found.append(f"{where}: the run dir is not writable")
        if r["disk_free_gb"] < MIN_DISK_GB:
            found.append(f"{where}: {r['disk_free_gb']} GB free in the run dir's file system")
    hosts = list(nodes)
    for host, saw in seen.items():
        missing = [h for h in hosts if h not in saw]
        if missing:
            found.append(f"the run dir on {host} is not the one on {', '.join(missing)} (a node-local folder?): "
                         "give every node the same shared run dir, or a lost node takes its checkpoints with it")
    speeds = {host: statistics.median(ranks[r]["compute_gflops"] for r in rs) for host, rs in nodes.items()}
    median = statistics.median(speeds.values())
    for host, speed in speeds.items():
        if speed * slow < median:
            found.append(f"{host} computes {median / speed:.1f}x slower than the median node "
                         f"({speed:.0f} GFLOP/s vs {median:.0f})")
    for p in pairs:
        if abs(p["clock_offset_s"]) - p["clock_bound_s"] > MAX_SKEW_S:
            a, b = (ranks[r]["host"] for r in p["pair"])
            found.append(f"the clock of {b} is {p['clock_offset_s']:+.1f} s off {a}'s: run NTP (chrony) on every node")
    if len(pairs) > 1:
        best = max(p["mb_per_s"] for p in pairs)
        for p in pairs:
            if p["mb_per_s"] * 2 < best:
                a, b = (ranks[r]["host"] for r in p["pair"])
                found.append(f"the link {a} - {b} moves {p['mb_per_s']} MB/s, under half the best pair's {best}")
    return found


def table(ranks: list[dict], nodes: dict[str, list[int]], pairs: list[dict], busbw: float) -> str:
    lines = []
    for host, rs in nodes.items():
        r = ranks[rs[0]]
        gpu = r["gpu"]
        lines += [f"node {host} (ranks {', '.join(map(str, rs))})",
                  f"  versions: python {r['python']}, torch {r['torch']}, cuda {r['cuda'] or 'none'}, "
                  f"nccl {r['nccl'] or 'none'}, gloo {'yes' if r['gloo'] else 'no'}",
                  f"  cpu {r['cpu']} ({' '.join(r['isa']) or 'no avx2'}), {r['mem_free_gb']} GB memory free",
                  f"  run dir: {'writable' if r['run_dir_writable'] else 'NOT writable'}, {r['disk_free_gb']} GB free; "
                  f"data: {'PROBLEM' if r['data'] else 'verified' if r['data_verified'] else 'present'}",
                  f"  interface {r['interface'] or '(one host: loopback)'} {r['address']}; compute "
                  + ", ".join(f"rank {i} {ranks[i]['compute_gflops']} GFLOP/s" for i in rs)]
        if gpu:
            lines.append(f"  gpu {gpu['name']}, {gpu['memory_gb']} GB, driver {gpu['driver'] or '?'}, "
                         f"matmul {gpu['matmul_tflops']} TFLOP/s")
    for p in pairs:
        a, b = (ranks[r]["host"] for r in p["pair"])
        lines.append(f"link {a} - {b}: {p['latency_ms']} ms, {p['mb_per_s']} MB/s; clock of {b} "
                     f"{p['clock_offset_s']:+.3f} s (+-{p['clock_bound_s']:.3f})")
    if len(ranks) > 1:
        lines.append(f"all_reduce over {len(ranks)} ranks: {busbw:.1f} MB/s bus bandwidth")
    return "\n".join(lines)


# --- the command ----------------------------------------------------------------------------------------
def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mnist-dist doctor", description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=os.environ.get("MNIST_DATA_DIR", "./data"), help="MNIST root to verify")
    p.add_argument("--run-dir", default="runs/default", help="the job's run dir: writable and shared by every node")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--no-verify-data", dest="verify_data", action="store_false",
                   help="only check that the four MNIST files are there, not their SHA-256")
    p.add_argument("--slow-factor", type=float, default=1.5,
                   help="name a node whose compute probe is this many times under the median node's")
    p.add_argument("--probe-mb", type=float, default=16, help="message size of the link and all_reduce probes")
    p.add_argument("--start-timeout", type=float, default=120, help="seconds for every rank to join")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> tuple[dict, list[str]]:
    env = distributed.read_env()
    device = devices.pick_device(args.device, env.local_rank)
    timeout = distributed.collective_timeout(args.start_timeout, 0)
    store = distributed.connect(env, timeout, args.start_timeout)
    distributed.init(env, store, device, timeout)
    try:
        group = dist.new_group(backend="gloo")  # the probes between hosts, whatever the training backend
        me = local_facts(args, device, env.rank)
        ranks = all_gather_json(me, env.world_size, group)
        nodes: dict[str, list[int]] = {}
        for r in ranks:
            nodes.setdefault(r["host"], []).append(r["rank"])
        leaders = [rs[0] for rs in nodes.values()]
        saw = all_gather_json(shared_run_dir(args.run_dir, me, leaders, env.rank, group), env.world_size, group)
        pairs = [p for found in all_gather_json(measure_pairs(leaders, env.rank, group, args.probe_mb),
                                                env.world_size, group) for p in found]
        busbw = allreduce_busbw(env.world_size, device, args.probe_mb) if env.world_size > 1 else 0.0
    finally:
        distributed.shutdown(clean=True)
    seen = {ranks[r]["host"]: saw[r] for r in leaders}
    report = {"ranks": ranks, "nodes": nodes, "links": pairs, "allreduce_busbw_mb_per_s": round(busbw, 1)}
    # on every rank: each exits 1 on a problem
    report["problems"] = problems(ranks, nodes, seen, pairs, args.slow_factor)
    if env.world_size == 1:
        report["not_checked"] = "one process: no other node to compare, no link or clock to measure"
    return report, [table(ranks, nodes, pairs, busbw)] if env.is_main else []


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        report, shown = run(args)
    except (UsageError, RuntimeError, OSError) as err:
        print(f"mnist-dist: error: doctor: {first_line(err)}", file=sys.stderr)
        return 1
    if not shown:  # ranks other than 0: rank 0 says it
        return 1 if report["problems"] else 0
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(shown[0])
        if "not_checked" in report:
            print(f"not checked: {report['not_checked']}")
    for line in report["problems"]:
        print(f"mnist-dist: error: {line}", file=sys.stderr)
    n = len(report["nodes"])
    if not report["problems"]:
        print(f"mnist-dist doctor: {n} node{'s' if n > 1 else ''}, {len(report['ranks'])} rank(s): all well",
              file=sys.stderr if args.json else sys.stdout)
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
