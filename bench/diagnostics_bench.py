"""What the hang post-mortems and the profiler cost, on real MNIST:

    python bench/diagnostics_bench.py --data-dir ../shared/data

1. A 2-rank job under torchrun with --hang-timeout 10 whose rank 1 is SIGSTOPped mid-epoch: seconds
   from the SIGSTOP to the hang line, to the post-mortem folder being complete (its newest file), and
   to torchrun's exit.
2. --profile-steps over one --log-every interval of a 1-process run: that interval's samples/s
   against the run's other intervals of the same epoch (the profiler's overhead on profiled steps).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ""}


def records(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def worker(torchrun: subprocess.Popen, rank: int) -> int:
    out = subprocess.run(["pgrep", "-P", str(torchrun.pid)], capture_output=True, text=True).stdout.split()
    for pid in map(int, out):
        if f"RANK={rank}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
            return pid
    raise RuntimeError(f"no rank {rank}")


def hang(data_dir: str, run: Path) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
           "mnist_dist.train", "--data-dir", data_dir, "--run-dir", str(run), "--hang-timeout", "10", "--epochs", "4"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: list[tuple[float, str]] = []
    reader = threading.Thread(target=lambda: lines.extend((time.perf_counter(), line) for line in proc.stderr))
    reader.start()
    while not any(r.get("step", 0) >= 300 for r in records(run)):
        time.sleep(0.01)
    os.kill(worker(proc, 1), signal.SIGSTOP)
    stopped_at, wall_stop = time.perf_counter(), time.time()
    proc.wait()
    ended = time.perf_counter() - stopped_at
    reader.join()
    said = next(t for t, line in lines if "no progress on any rank" in line) - stopped_at
    [folder] = (run / "hangs").iterdir()
    complete = max(p.stat().st_mtime for p in folder.iterdir()) - wall_stop
    return {"line_s": said, "folder_s": complete, "exit_s": ended}


def profile_overhead(data_dir: str, run: Path) -> float:
    cmd = [sys.executable, "-m", "mnist_dist.train", "--data-dir", data_dir, "--run-dir", str(run), "--epochs", "1",
           "--log-every", "100", "--profile-steps", "401-500"]
    subprocess.run(cmd, cwd=ROOT, env=ENV, check=True, capture_output=True)
    rates = {r["step"]: r["samples_per_s"] for r in records(run) if "samples_per_s" in r}
    others = [v for step, v in rates.items() if step not in (100, 500) and step % 100 == 0]  # the first warms up
    return statistics.median(others) / rates[500]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=os.environ.get("MNIST_DATA_DIR", "../shared/data"))
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        hangs = [hang(args.data_dir, Path(tmp) / f"hang{i}") for i in range(args.repeats)]
        slow = [profile_overhead(args.data_dir, Path(tmp) / f"profile{i}") for i in range(args.repeats)]
    for key, what in (("line_s", "the hang line"), ("folder_s", "the post-mortem folder complete"),
                      ("exit_s", "torchrun's exit")):
        print(f"SIGSTOP of rank 1 -> {what}: " + " / ".join(f"{h[key]:.1f}" for h in hangs) + " s (--hang-timeout 10)")
    print("profiled steps take " + " / ".join(f"{x:.2f}x" for x in slow) + " the time of unprofiled ones (1 process)")


if __name__ == "__main__":
    main()
