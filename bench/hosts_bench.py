"""Throughput across hosts: two "hosts" (network namespaces joined by a veth switch, tests/hosts.py), one
rank each, gloo over the link, unlimited and with htb rate limits. Needs root.

    python bench/hosts_bench.py --data-dir ../shared/data [--epochs 1] [--rates unlimited,1gbit]

Prints one line per rate: the epoch's training seconds (metrics.jsonl's epoch_train_s on rank 0) and
samples/s, the mean over the epochs after the first; and the bus rate that the job's communication-bound
note measured, if it said one.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from helpers import job_env  # noqa: E402
from hosts import Hosts, unavailable  # noqa: E402


def two_hosts(data: str, epochs: int, rate: str, work: Path) -> list[dict]:
    run = work / f"run-{rate}"
    shutil.rmtree(run, ignore_errors=True)
    flags = ["--data-dir", data, "--run-dir", str(run), "--epochs", str(epochs), "--no-verify-data", "--no-download"]
    with Hosts(work, ["nodeA", "nodeB"]) as hosts:
        if rate != "unlimited":
            for host in hosts:
                host.limit(rate)
        procs = [h.start([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={i}",
                          "--nproc-per-node=1", "--master-addr=nodeA", "--master-port=29500", "-m", "mnist_dist.train",
                          *flags], env=job_env(), stdout=subprocess.DEVNULL) for i, h in enumerate(hosts)]
        for proc in procs:
            _, err = proc.communicate(timeout=1800)
            if proc.returncode:
                raise SystemExit(f"the {rate} run failed: {err[-2000:]}")
    return list(map(json.loads, (run / "metrics.jsonl").read_text().splitlines()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--rates", default="unlimited,1gbit")
    args = ap.parse_args()
    if (why := unavailable()) is not None:
        raise SystemExit(f"hosts_bench: {why}")
    work = ROOT / "runs" / "hosts-bench"
    work.mkdir(parents=True, exist_ok=True)
    for rate in args.rates.split(","):
        records = two_hosts(str(Path(args.data_dir).resolve()), args.epochs, rate, work)
        epochs = [r for r in records if "epoch_train_s" in r]
        timed = epochs[1:] or epochs
        seconds = sum(r["epoch_train_s"] for r in timed) / len(timed)
        bound = [f"communication-bound at {r['bus_mb_per_s']:.1f} MB/s ({r['wait_share']:.0%} of each step waits)"
                 for r in records if r.get("event") == "communication_bound"]
        print(f"2 hosts x 1 rank, gloo over a veth, {rate:>9}: {seconds:5.2f} s an epoch "
              f"({60000 / seconds:,.0f} samples/s), test_acc {epochs[-1]['test_acc']:.2%}; "
              f"{bound[0] if bound else 'not communication-bound'}", flush=True)


if __name__ == "__main__":
    main()
