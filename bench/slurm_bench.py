"""Slurm timings on the test cluster (tests/slurm/cluster.sh; needs root and apt):

    python bench/slurm_bench.py --data-dir ../shared/data

1. sbatch -> the first training step (log every step), 2 ranks on one node;
2. a preempt-requeue-resume cycle: USR1 to the ranks -> checkpoint -> exit 75 -> scontrol requeue
   -> (Slurm's 2-minute BeginTime delay skipped with `scontrol update StartTime=now`, as the tests
   do) -> the requeued job's first new training step.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "tests" / "slurm" / "cluster.sh"
SETTLE_S = 3  # as in the tests: restarting within ~0.2 s of a requeue can fail with "credential revoked"


def records(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def poll(predicate, timeout: float = 300, every: float = 0.01):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return time.perf_counter()
        time.sleep(every)
    raise TimeoutError


def sbatch(env: dict, out: Path, run: Path, data: str, *flags: str) -> str:
    cmd = ["sbatch", "--parsable", f"--chdir={ROOT}", f"--output={out}/%x-%j.out", str(ROOT / "slurm" / "train.sbatch"),
           "--data-dir", data, "--run-dir", str(run), *flags]
    return subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout.strip()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=os.environ.get("MNIST_DATA_DIR", "../shared/data"))
    args = p.parse_args()
    data = str(Path(args.data_dir).resolve())
    folder = Path(f"/tmp/slb-{os.getpid()}")
    subprocess.run([str(CLUSTER), "start", str(folder)], check=True, capture_output=True)
    env = {
        **os.environ,
        "SLURM_CONF": str(folder / "etc" / "slurm.conf"),
        "PYTHON": sys.executable,
        "WANDB_MODE": "disabled",
    }
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            starts = []
            for i in range(3):
                run = tmp / f"first{i}"
                t0 = time.perf_counter()
                sbatch(env, tmp, run, data, "--epochs", "1", "--log-every", "1")
                starts.append(poll(lambda run=run: len(records(run)) > 0) - t0)
            run = tmp / "preempt"
            job = sbatch(env, tmp, run, data, "--epochs", "2", "--log-every", "10")
            poll(lambda: any(r["step"] >= 300 for r in records(run)))
            t0 = time.perf_counter()
            subprocess.run(["scancel", "--signal=USR1", job], env=env, check=True)
            ckpt_dir = run / "checkpoints"
            poll(lambda: any(ckpt_dir.glob("ckpt-*.pt")))
            saved = max(int(p.stem.split("-")[1]) for p in ckpt_dir.glob("ckpt-*.pt"))

            pending = []

            def resumed() -> bool:
                out = subprocess.run(
                    ["scontrol", "show", "job", job, "-o"], env=env, capture_output=True, text=True
                ).stdout
                if "JobState=PENDING" in out and "Reason=BeginTime" in out:
                    pending.append(time.monotonic())
                    if pending[-1] - pending[0] >= SETTLE_S:  # let the old incarnation clean up first
                        subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=env, check=True)
                return any(r["step"] > saved for r in records(run))

            cycle = poll(resumed, every=0.05) - t0
    finally:
        subprocess.run([str(CLUSTER), "stop", str(folder)], capture_output=True)
    print(f"sbatch -> first training step: {min(starts):.1f} s (best of 3; {', '.join(f'{s:.1f}' for s in starts)})")
    print(f"preempt -> checkpoint -> requeue -> first resumed step: {cycle:.1f} s, of which {SETTLE_S} s waiting "
          f"before the kick (Slurm's own 2-min requeue delay skipped)")


if __name__ == "__main__":
    main()
