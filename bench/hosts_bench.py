"""Throughput across hosts, by gradient compression: two "hosts" (network namespaces joined by a veth switch,
tests/hosts.py), one rank each, gloo over the link, with htb rate limits; against two ranks on one host
(shared memory). Needs root.

    python bench/hosts_bench.py --data-dir ../shared/data [--epochs 4] [--rates 1gbit,100mbit]
        [--compressions none,fp16,bf16,powersgd] [-- more training flags]

One line per run: the epoch's training seconds (metrics.jsonl's epoch_train_s on rank 0), the mean over the
epochs after the first and the first alone (PowerSGD's plain all_reduce steps fall in it), the ratio to one
host, MB per step on the wire (what nodeA's cable sent, over the run's steps: headers and the one-off
transfers included), the final test accuracy; and the bus rate of the job's communication-bound note, if
it said one. Then a Markdown table of the same figures.
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


def sent_bytes(host) -> int:
    line = next(line for line in host.sh("cat /proc/net/dev").splitlines() if line.strip().startswith("eth0:"))
    return int(line.split(":")[1].split()[8])


def one_host(flags: list[str], run: Path) -> list[dict]:
    """Two ranks on this host (shared memory): the baseline."""
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                    "-m", "mnist_dist.train", *flags, "--run-dir", str(run)], env=job_env(), cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL)
    return list(map(json.loads, (run / "metrics.jsonl").read_text().splitlines()))


def two_hosts(flags: list[str], rate: str, run: Path, work: Path) -> tuple[list[dict], int]:
    """One rank on each of two hosts joined at `rate`: the run's records and what nodeA's cable sent."""
    with Hosts(work, ["nodeA", "nodeB"]) as hosts:
        if rate != "unlimited":
            for host in hosts:
                host.limit(rate)
        before = sent_bytes(hosts[0])
        procs = [h.start([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={i}",
                          "--nproc-per-node=1", "--master-addr=nodeA", "--master-port=29500", "-m", "mnist_dist.train",
                          *flags, "--run-dir", str(run)], env=job_env(), stdout=subprocess.DEVNULL)
                 for i, h in enumerate(hosts)]
        for proc in procs:
            _, err = proc.communicate(timeout=3600)
            if proc.returncode:
                raise SystemExit(f"the {rate} run failed: {err[-2000:]}")
        sent = sent_bytes(hosts[0]) - before
    return list(map(json.loads, (run / "metrics.jsonl").read_text().splitlines())), sent


def figures(records: list[dict]) -> dict:
    epochs = [r for r in records if "epoch_train_s" in r]
    later = epochs[1:] or epochs
    bound = [r for r in records if r.get("event") == "communication_bound"]
    return {"steady_s": sum(r["epoch_train_s"] for r in later) / len(later), "first_s": epochs[0]["epoch_train_s"],
            "test_acc": epochs[-1]["test_acc"], "steps": epochs[-1]["step"],
            "bound": f"communication-bound at {bound[0]['bus_mb_per_s']:.1f} MB/s" if bound else "not comm.-bound"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--rates", default="1gbit,100mbit")
    ap.add_argument("--compressions", default="none,fp16,bf16,powersgd")
    ap.add_argument("extra", nargs="*", help="more training flags, after --")
    args = ap.parse_args()
    if (why := unavailable()) is not None:
        raise SystemExit(f"hosts_bench: {why}")
    work = ROOT / "runs" / "hosts-bench"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    flags = ["--data-dir", str(Path(args.data_dir).resolve()), "--epochs", str(args.epochs), "--no-verify-data",
             "--no-download", "--wandb", "disabled", "--progress", "off", *args.extra]
    base = figures(one_host(flags, work / "one-host"))
    print(f"2 ranks on one host (shared memory): {base['steady_s']:5.2f} s an epoch after the first "
          f"({base['first_s']:.2f} s the first), test_acc {base['test_acc']:.2%}", flush=True)
    rows = []
    for rate in args.rates.split(","):
        for kind in args.compressions.split(","):
            records, sent = two_hosts([*flags, "--grad-compression", kind], rate, work / f"run-{rate}-{kind}", work)
            f = figures(records)
            ratio, mb = f["steady_s"] / base["steady_s"], sent / f["steps"] / 1e6
            rows.append((rate, kind, f, ratio, mb))
            print(f"2 hosts x 1 rank, {rate:>9}, {kind:>8}: {f['steady_s']:5.2f} s an epoch after the first "
                  f"({ratio:.2f}x one host; the first {f['first_s']:.2f} s), {mb:.3f} MB a step on the wire, "
                  f"test_acc {f['test_acc']:.2%}; {f['bound']}", flush=True)
    print("\n| link | compression | s / epoch (after the 1st) | x one host | 1st epoch | MB / step on the wire "
          "| test acc |")
    print("|---|---|---|---|---|---|---|")
    print(f"| one host, shm | none | {base['steady_s']:.2f} | 1.00 | {base['first_s']:.2f} | - | "
          f"{base['test_acc']:.2%} |")
    for rate, kind, f, ratio, mb in rows:
        print(f"| {rate} | {kind} | {f['steady_s']:.2f} | {ratio:.2f} | {f['first_s']:.2f} | {mb:.3f} | "
              f"{f['test_acc']:.2%} |")


if __name__ == "__main__":
    main()
