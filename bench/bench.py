"""Speed of mnist-dist against the conventional pipeline, measured side by side in one run.

    python bench/bench.py --data-dir ../shared/data [--conventional-epochs 1]

Prints a Markdown table (the README's). Everything runs on this machine's CPU unless CUDA is visible.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}


def torchrun(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]


def ours(nproc: int, data_dir: str, run_dir: Path, env: dict = ENV) -> dict:
    """Wall time of the whole default command, and per-epoch figures from its metrics.jsonl."""
    flags = ["--data-dir", data_dir, "--run-dir", str(run_dir), "--no-resume", "--overwrite"]
    cmd = [sys.executable, "-m", "mnist_dist.train", *flags] if nproc == 1 else torchrun(nproc, "-m", "mnist_dist.train", *flags)
    t = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True)
    wall = time.perf_counter() - t
    evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if "test_acc" in r]
    s = json.loads((run_dir / "summary.json").read_text())
    to97 = next((r["elapsed_s"] for r in evals if r["test_acc"] >= 0.97), float("nan"))
    return {"wall_s": wall, "epoch_s": min(r["epoch_train_s"] for r in evals), "test_acc": s["test_acc"],
            "to97_s": to97, "rss_mb": s["peak_rss_mb"]}


def conventional(nproc: int, data_dir: str, epochs: int) -> dict:
    out = subprocess.run(torchrun(nproc, str(ROOT / "bench" / "conventional.py"), data_dir, str(epochs)),
                         cwd=ROOT, env={**ENV, "PYTHONPATH": str(ROOT)}, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def checkpoint_ms(run_dir: Path) -> tuple[float, float]:
    """Save (fsync included) and load of the MLP's checkpoint, median of 20, in ms."""
    import statistics


    from mnist_dist import checkpoint

    state = checkpoint.load(run_dir / "checkpoints" / "best.pt")
    saves, loads = [], []
    for _ in range(20):
        t = time.perf_counter()
        path = checkpoint.save(state, run_dir / "bench-ckpt", keep_last=1, is_best=False)
        saves.append(time.perf_counter() - t)
        t = time.perf_counter()
        checkpoint.load(path)
        loads.append(time.perf_counter() - t)
    return statistics.median(saves) * 1e3, statistics.median(loads) * 1e3


def signal_to_exit_s(data_dir: str, run_dir: Path) -> float:
    """SIGTERM to a training process in full flight, until it has checkpointed and exited."""
    cmd = [sys.executable, "-m", "mnist_dist.train", "--data-dir", data_dir, "--run-dir", str(run_dir),
           "--epochs", "5", "--no-resume", "--overwrite"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = run_dir / "metrics.jsonl"
    while not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        time.sleep(0.01)
    t = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    proc.wait()
    assert proc.returncode == 75, proc.returncode
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=os.environ.get("MNIST_DATA_DIR", "../shared/data"))
    p.add_argument("--conventional-epochs", type=int, default=1)
    args = p.parse_args()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rows = []
        for nproc in (1, 2):
            o = ours(nproc, args.data_dir, tmp / f"ours{nproc}")
            c = conventional(nproc, args.data_dir, args.conventional_epochs)
            rows.append((nproc, o, c))
        default_env = {k: v for k, v in ENV.items() if k != "WANDB_MODE"}
        with_wandb = [ours(1, args.data_dir, tmp / f"wandb{i}", env=default_env) for i in range(3)]
        save_ms, load_ms = checkpoint_ms(tmp / "ours1")
        stop_s = signal_to_exit_s(args.data_dir, tmp / "stop")
    print("| ranks | mnist-dist epoch | conventional epoch | speed-up | default run wall (W&B off) | time to 97% | test acc | peak RSS/rank |")
    print("|---|---|---|---|---|---|---|---|")
    for nproc, o, c in rows:
        print(f"| {nproc} | {o['epoch_s']:.3f} s | {c['epoch_s']:.2f} s | {c['epoch_s'] / o['epoch_s']:.1f}x | "
              f"{o['wall_s']:.1f} s | {o['to97_s']:.1f} s | {o['test_acc']:.2%} | {o['rss_mb']:.0f} MB |")
    steps = 60000 / 64
    step_ms, raw = rows[1][1]["epoch_s"] / steps * 1e3, rows[1][2]
    print(f"\n2 ranks: {step_ms:.2f} ms a step (1 process: {rows[0][1]['epoch_s'] / steps * 1e3:.2f} ms). Raw exchange "
          f"of the {raw['params']:,} gradient floats: mnist-dist's shared-memory average {raw['shm_average_ms']:.3f} ms "
          f"({raw['shm_average_ms'] / step_ms:.0%} of the step), gloo's all_reduce {raw['allreduce_ms']:.2f} ms "
          f"({raw['allreduce_ms'] / step_ms:.0%} of the step).")
    walls = " / ".join(f"{o['wall_s']:.1f}" for o in with_wandb)
    print(f"1 process, default W&B mode (auto: offline here, with images each epoch), three runs: {walls} s wall, "
          f"test acc {with_wandb[0]['test_acc']:.2%}")
    print(f"checkpoint save (fsync included) {save_ms:.1f} ms, load {load_ms:.1f} ms; "
          f"SIGTERM to exit (checkpoint included) {stop_s:.2f} s")
    print(f"bench wall time {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
