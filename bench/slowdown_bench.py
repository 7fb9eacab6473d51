"""What per-rank timing and the progress display cost, and how fast a slow rank is named, on real MNIST:

    python bench/slowdown_bench.py --data-dir ../shared/data [--nproc 2] [--device cpu] [--repeats 5]
    python bench/slowdown_bench.py --data-dir ../shared/data --skip-slow-rank -- --cpu-allreduce gloo

1. Cost: the same job (--nproc ranks, 3 epochs, MLP) with per-rank timing and progress lines (the
   defaults in a log) and with `--straggler-factor 0 --progress off`, alternated, --repeats times
   each: the median training seconds (summary.json's train_seconds) and their ratio. Runs on a small
   host differ by more than the cost, so the per-step work they add (the comm hook's wrapper, the
   wait's reading, the progress check) is also timed alone, per step, against the job's step time.
2. A slow rank (CPU, 3 ranks, needs root and a cgroup cpu controller): rank 1 held to 15% of a CPU
   from its first log interval; the samples/s before and while held, and the seconds and log intervals
   from the quota to the warning that names it.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from helpers import cpu_quota, cpu_quota_unavailable, job_env, worker_pid  # noqa: E402

OFF = ("--straggler-factor", "0", "--progress", "off")


def command(nproc: int, data: str, run: Path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m",
            "mnist_dist.train", "--data-dir", data, "--run-dir", str(run), "--no-download", "--overwrite", *flags]


def env(device: str) -> dict:
    environ = job_env()  # which hides the GPUs: show them where asked to
    if device == "cuda":
        environ["CUDA_VISIBLE_DEVICES"] = os.environ.get("CUDA_VISIBLE_DEVICES", "0")
    return environ


def train_seconds(nproc: int, data: str, run: Path, device: str, *flags: str) -> float:
    res = subprocess.run(command(nproc, data, run, "--device", device, "--epochs", "3", *flags), cwd=ROOT,
                         env=env(device), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if res.returncode:
        raise SystemExit(f"the run failed ({res.returncode}):\n{res.stderr[-3000:]}")
    return json.loads((run / "summary.json").read_text())["train_seconds"]


def per_step_us() -> float:
    """Microseconds a step spends in the timing's and the progress display's per-step calls."""
    import io

    import torch

    from mnist_dist.progress_display import Lines
    from mnist_dist.rank_timing import RankTiming

    timing, lines = RankTiming(torch.device("cpu"), 2, 0), Lines(io.StringIO())
    hook = timing.hook(lambda state, bucket: None)
    n = 200_000
    lines.start_epoch(1, 1, n + 1, 0, 64)
    start = time.perf_counter()
    for step in range(1, n + 1):
        hook(None, None)
        timing.after_backward()
        lines.step(step)
    return (time.perf_counter() - start) / n * 1e6


def records(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def slow_rank(data: str, run: Path) -> dict:
    proc = subprocess.Popen(command(3, data, run, "--batch-size", "96", "--log-every", "200", "--epochs", "4"),
                            cwd=ROOT, env=job_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while not any("rank_compute_s" in r for r in records(run)):
        time.sleep(0.01)
    with cpu_quota(worker_pid(proc, 1), 0.15):
        start, held_from = time.perf_counter(), records(run)[-1]["step"]
        while not any(r.get("event") == "straggler" for r in records(run)):
            time.sleep(0.01)
        named_s = time.perf_counter() - start
    proc.communicate()
    rs = records(run)
    named = next(r for r in rs if r.get("event") == "straggler")
    intervals = [r for r in rs if "rank_compute_s" in r]
    before = [r["samples_per_s"] for r in intervals if r["step"] <= held_from]
    held = [r["samples_per_s"] for r in intervals if held_from < r["step"] <= named["step"]]
    return {"named_s": named_s, "intervals": len(held), "before": statistics.median(before),
            "held": statistics.median(held[1:] or held), "line": named["message"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=os.environ.get("MNIST_DATA_DIR", "../shared/data"))
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--skip-slow-rank", action="store_true")
    p.add_argument("train_flags", nargs="*", help="after --: more flags for both runs of part 1")
    args = p.parse_args()
    data = str(Path(args.data_dir).resolve())
    on, off = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):  # a fresh run dir each time (a finished one would resume and do nothing)
            on.append(train_seconds(args.nproc, data, Path(tmp) / f"on{i}", args.device, *args.train_flags))
            off.append(train_seconds(args.nproc, data, Path(tmp) / f"off{i}", args.device, *args.train_flags, *OFF))
        how = " ".join([args.device, *args.train_flags])
        print(f"{args.nproc} rank(s) on {how}, 3 epochs, {args.repeats} runs each: training "
              f"{statistics.median(on):.3f} s with per-rank timing and progress lines, {statistics.median(off):.3f} s "
              f"without (--straggler-factor 0 --progress off): {statistics.median(on) / statistics.median(off):.3f}x "
              f"(runs: {' '.join(f'{x:.2f}' for x in on)} / {' '.join(f'{x:.2f}' for x in off)})", flush=True)
        step_ms = statistics.median(off) * 1000 / (3 * 60_000 / 64)  # 3 epochs of 938 global steps
        cost = per_step_us()
        print(f"per-step work of the timing and the progress check: {cost:.2f} us a step, {cost / step_ms / 10:.3f}% "
              f"of the job's {step_ms:.2f} ms step", flush=True)
        if args.skip_slow_rank or args.device != "cpu":
            return
        if (why := cpu_quota_unavailable()) is not None:
            print(f"slow rank: skipped ({why})")
            return
        got = slow_rank(data, Path(tmp) / "slow")
        print(f"3 ranks, rank 1 held to 15% of a CPU: {got['before']:,.0f} -> {got['held']:,.0f} samples/s; named "
              f"{got['named_s']:.1f} s after the quota, {got['intervals']} log intervals of 200 steps:")
        print(f"  {got['line']}")


if __name__ == "__main__":
    main()
