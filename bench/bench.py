"""Speed of mnist-dist against the conventional pipeline, measured side by side in one run.

    python bench/bench.py --data-dir ../shared/data [--conventional-epochs 1] [--repeats 3]
    python bench/bench.py --device cuda --nprocs 1      # both pipelines on the GPU (one rank per GPU)
    python bench/bench.py --exact-models mlp,mlp8,cnn    # also one epoch of the CNN, default vs --exact
    python bench/bench.py --exact-only                   # the --exact lines alone

Prints a Markdown table (the README's). Both pipelines run on --device (default: the CPU, with GPUs
hidden, so that a GPU machine does not compare a GPU run against a CPU one).
Each pipeline runs --repeats times, alternating; an epoch time is the best of all runs (as timeit
reports the minimum: slower runs are other load on the machine), wall times are medians, and every
run's figure is printed too, so the spread is in plain sight.
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
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}


def torchrun(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]


def env_for(device: str, base: dict = ENV) -> dict:
    return {**base, "CUDA_VISIBLE_DEVICES": ""} if device == "cpu" else base


def our_cmd(nproc: int, data_dir: str, run_dir: Path, device: str, *extra: str) -> list[str]:
    flags = [
        "--data-dir", data_dir, "--run-dir", str(run_dir), "--no-resume", "--overwrite", "--device", device, *extra,
    ]
    return (
        [sys.executable, "-m", "mnist_dist.train", *flags]
        if nproc == 1
        else torchrun(nproc, "-m", "mnist_dist.train", *flags)
    )


def conventional_cmd(nproc: int, data_dir: str, epochs: int, device: str) -> list[str]:
    return torchrun(nproc, str(ROOT / "bench" / "conventional.py"), data_dir, str(epochs), device)


def ours(nproc: int, data_dir: str, run_dir: Path, device: str, env: dict = ENV, flags: tuple = ()) -> dict:
    """Wall time of the whole command (the default one unless `flags`), and per-epoch figures from its
    metrics.jsonl."""
    t = time.perf_counter()
    subprocess.run(our_cmd(nproc, data_dir, run_dir, device, *flags), cwd=ROOT, env=env_for(device, env), check=True,
                   capture_output=True)
    wall = time.perf_counter() - t
    evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if "test_acc" in r]
    s = json.loads((run_dir / "summary.json").read_text())
    to97 = next((r["elapsed_s"] for r in evals if r["test_acc"] >= 0.97), float("nan"))
    return {"wall_s": wall, "epoch_s": min(r["epoch_train_s"] for r in evals), "test_acc": s["test_acc"],
            "to97_s": to97, "rss_mb": s["peak_rss_mb"], "fingerprint": s["fingerprint"]}


EXACT_CASES = {  # --exact-models name: (label, flags of both modes, flags of --exact's runs besides --exact)
    "mlp": ("mlp", (), ()), "mlp8": ("mlp, --pieces 8", (), ("--pieces", "8")),
    "cnn": ("cnn, 1 epoch", ("--model", "cnn", "--epochs", "1"), ()),
}


def exact_vs_default(
    nprocs: list[int], cases: list[str], repeats: int, data_dir: str, tmp: Path, device: str
) -> list[str]:
    """The table's lines: per case and world size, the default mode's and --exact's best epoch (runs
    alternate), the ratio, both test accuracies and --exact's fingerprint (the same on every line of a case)."""
    lines = [
        "| model | ranks | default epoch | --exact epoch | ratio | test acc default / --exact | --exact fingerprint |",
        "|---|---|---|---|---|---|---|",
    ]
    for case in cases:
        label, flags, exact_flags = EXACT_CASES[case]
        for nproc in nprocs:
            default, exact = [], []
            for _ in range(1 if "cnn" in case else repeats):  # a CNN epoch takes a minute on a CPU
                default.append(ours(nproc, data_dir, tmp / "default", device, flags=flags))
                exact.append(ours(nproc, data_dir, tmp / "exact", device, flags=(*flags, "--exact", *exact_flags)))
            d, e = (min(r["epoch_s"] for r in runs) for runs in (default, exact))
            lines.append(f"| {label} | {nproc} | {d:.3f} s | {e:.3f} s | {e / d:.2f}x | {default[0]['test_acc']:.2%} / "
                         f"{exact[0]['test_acc']:.2%} | {exact[0]['fingerprint']} |")
    return lines


def conventional(nproc: int, data_dir: str, epochs: int, device: str) -> dict:
    out = subprocess.run(
        conventional_cmd(nproc, data_dir, epochs, device), cwd=ROOT,
        env=env_for(device, {**ENV, "PYTHONPATH": str(ROOT)}), check=True, capture_output=True, text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def checkpoint_ms(run_dir: Path) -> tuple[float, float]:
    """Save (fsync included) and load of the MLP's checkpoint, median of 20, in ms."""
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


def signal_to_exit_s(data_dir: str, run_dir: Path, device: str) -> float:
    """SIGTERM to a training process in full flight, until it has checkpointed and exited."""
    cmd = our_cmd(1, data_dir, run_dir, device) + ["--epochs", "5"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env_for(device), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where both pipelines run")
    p.add_argument("--nprocs", default="1,2", help="world sizes to time (on GPUs: at most the GPUs)")
    p.add_argument(
        "--exact-models",
        default="mlp,mlp8",
        help="what to time with and without --exact: mlp, mlp8 (--pieces 8), cnn ('' for none)",
    )
    p.add_argument(
        "--exact-only",
        action="store_true",
        help="only the --exact lines, not the comparison with the conventional pipeline",
    )
    args = p.parse_args()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if not args.exact_only:
            versus_conventional(args, Path(tmp))
        exact = exact_vs_default(
            [int(n) for n in args.nprocs.split(",")], [m for m in args.exact_models.split(",") if m], args.repeats,
            args.data_dir, Path(tmp), args.device,
        )
    print("\n" + "\n".join(exact))
    print(f"\nbench wall time {time.perf_counter() - t0:.0f} s")


def versus_conventional(args: argparse.Namespace, tmp: Path) -> None:
    """Both pipelines, alternating; then the W&B, checkpoint and stop-signal figures. Prints the table."""
    rows = []
    for nproc in map(int, args.nprocs.split(",")):
        runs, convs = [], []
        for _ in range(args.repeats):
            runs.append(ours(nproc, args.data_dir, tmp / f"ours{nproc}", args.device))
            convs.append(conventional(nproc, args.data_dir, args.conventional_epochs, args.device))
        rows.append((nproc, runs, convs))
    default_env = {k: v for k, v in ENV.items() if k != "WANDB_MODE"}
    with_wandb = [ours(1, args.data_dir, tmp / f"wandb{i}", args.device, env=default_env) for i in range(args.repeats)]
    save_ms, load_ms = checkpoint_ms(tmp / "ours1")
    stop_s = signal_to_exit_s(args.data_dir, tmp / "stop", args.device)
    print(
        "| ranks | mnist-dist epoch | conventional epoch | speed-up | default run wall (W&B off) | time to 97% "
        "| test acc | peak RSS/rank |"
    )
    print("|---|---|---|---|---|---|---|---|")
    best = []
    for nproc, runs, convs in rows:
        o = {"epoch_s": min(r["epoch_s"] for r in runs), "wall_s": statistics.median(r["wall_s"] for r in runs),
             "to97_s": statistics.median(r["to97_s"] for r in runs), "test_acc": runs[0]["test_acc"],
             "rss_mb": max(r["rss_mb"] for r in runs)}
        c = {**convs[0], **{key: min(conv[key] for conv in convs) for key in convs[0] if key.endswith(("_s", "_ms"))}}
        best.append((o, c))
        print(f"| {nproc} | {o['epoch_s']:.3f} s | {c['epoch_s']:.2f} s | {c['epoch_s'] / o['epoch_s']:.1f}x | "
              f"{o['wall_s']:.1f} s | {o['to97_s']:.1f} s | {o['test_acc']:.2%} | {o['rss_mb']:.0f} MB |")
    for nproc, runs, convs in rows:
        print(f"\n{nproc} rank(s), run by run: mnist-dist epoch " + " / ".join(f"{r['epoch_s']:.3f}" for r in runs)
              + " s, conventional " + " / ".join(f"{c['epoch_s']:.2f}" for c in convs) + " s, mnist-dist wall "
              + " / ".join(f"{r['wall_s']:.1f}" for r in runs) + " s", end="")
    steps = 60000 / 64
    print(f"\n\n1 process: {best[0][0]['epoch_s'] / steps * 1e3:.3f} ms a step, {60000 / best[0][0]['epoch_s']:,.0f} "
          f"samples/s ({args.device}).", end="")
    if len(best) > 1 and "shm_average_ms" in best[1][1]:
        step_ms, raw = best[1][0]["epoch_s"] / steps * 1e3, best[1][1]
        print(
            f" 2 ranks: {step_ms:.2f} ms a step. Raw exchange of the {raw['params']:,} gradient floats: mnist-dist's "
            f"shared-memory average {raw['shm_average_ms']:.3f} ms ({raw['shm_average_ms'] / step_ms:.0%} of the "
            f"step), gloo's all_reduce {raw['allreduce_ms']:.2f} ms ({raw['allreduce_ms'] / step_ms:.0%} of the step).",
            end="",
        )
    print()
    walls = " / ".join(f"{o['wall_s']:.1f}" for o in with_wandb)
    print(f"1 process, default W&B mode (auto: offline here, with images each epoch), run by run: {walls} s wall, "
          f"test acc {with_wandb[0]['test_acc']:.2%}")
    print(f"checkpoint save (fsync included) {save_ms:.1f} ms, load {load_ms:.1f} ms; "
          f"SIGTERM to exit (checkpoint included) {stop_s:.2f} s")


if __name__ == "__main__":
    main()
