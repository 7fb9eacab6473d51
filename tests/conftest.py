"""Shared fixtures: tiny synthetic MNIST-format data, and helpers that run the job as a user would."""
from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

# The suite tests the CPU path it asserts, also on a GPU machine (an empty value hides every GPU).
os.environ["CUDA_VISIBLE_DEVICES"] = ""
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
REAL_DATA = os.environ.get("MNIST_DATA_DIR", "")


def write_idx(folder: Path, n_train: int, n_test: int, seed: int = 0) -> None:
    """MNIST-format IDX files: each digit class is a fixed random blob pattern plus noise (learnable)."""
    g = torch.Generator().manual_seed(seed)
    protos = (torch.rand(10, 28, 28, generator=g) > 0.7).float() * 200
    raw = folder / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = torch.arange(n) % 10
        labels = labels[torch.randperm(n, generator=g)]
        noise = torch.rand(n, 28, 28, generator=g) * 55
        images = (protos[labels] + noise).clamp(0, 255).to(torch.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, n, 28, 28) + images.numpy().tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + labels.to(torch.uint8).numpy().tobytes())


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """512 training and 200 test images."""
    folder = tmp_path_factory.mktemp("tiny-mnist")
    write_idx(folder, 512, 200)
    return folder


@pytest.fixture(scope="session")
def small_data(tmp_path_factory) -> Path:
    """2048 training images: a CNN run long enough to interrupt (256 steps at batch 8), and short."""
    folder = tmp_path_factory.mktemp("small-mnist")
    write_idx(folder, 2048, 200, seed=3)
    return folder


@pytest.fixture(scope="session")
def medium_data(tmp_path_factory) -> Path:
    """8192 training images: long enough (a few seconds) to interrupt a run in the middle."""
    folder = tmp_path_factory.mktemp("medium-mnist")
    write_idx(folder, 8192, 200, seed=1)
    return folder


def job_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_", "SLURM_", "TORCHELASTIC"))}
    env.update({"WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
    env.update(extra)
    env = {k: v for k, v in env.items() if v != ""}  # an empty value means: unset it
    return {**env, "CUDA_VISIBLE_DEVICES": ""}  # but this one: empty hides every GPU


def train_cmd(nproc: int, *flags: str, restarts: int = 0) -> list[str]:
    """`python -m mnist_dist.train` for one process, torchrun for several (as the README says)."""
    if nproc == 1 and not restarts:
        return [sys.executable, "-m", "mnist_dist.train", *flags]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            f"--max-restarts={restarts}", "-m", "mnist_dist.train", *flags]


def run_train(nproc: int, data: Path, run_dir: Path, *flags: str, timeout: float = 180, env: dict | None = None,
              restarts: int = 0) -> subprocess.CompletedProcess:
    cmd = train_cmd(nproc, "--data-dir", str(data), "--run-dir", str(run_dir), "--no-verify-data", "--no-download", *flags,
                    restarts=restarts)
    return subprocess.run(cmd, cwd=ROOT, env=env or job_env(), capture_output=True, text=True, timeout=timeout)


STARTED: list[subprocess.Popen] = []


def start_train(nproc: int, data: Path, run_dir: Path, *flags: str, restarts: int = 0) -> subprocess.Popen:
    """A training run in the background, in its own process group (killed after the test if still alive)."""
    cmd = train_cmd(nproc, "--data-dir", str(data), "--run-dir", str(run_dir), "--no-verify-data", "--no-download", *flags,
                    restarts=restarts)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=job_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    STARTED.append(proc)
    return proc


@pytest.fixture(autouse=True)
def no_leftover_runs():
    """A failed test must not leave training processes behind (they would compete with later tests)."""
    yield
    while STARTED:
        proc = STARTED.pop()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def wait_for(predicate, timeout: float = 60, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what}")


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def params(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, weights_only=True)["model"]


def final_ckpt(run_dir: Path) -> Path:
    return sorted((run_dir / "checkpoints").glob("ckpt-*.pt"))[-1]


def children(proc: subprocess.Popen) -> list[int]:
    """The pids of proc's child processes (torchrun's workers, or rank 0's W&B process)."""
    return [int(pid) for pid in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()]


def worker_pid(torchrun: subprocess.Popen, rank: int) -> int:
    """The pid of the worker that torchrun started as `rank`."""
    for pid in children(torchrun):
        if f"RANK={rank}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
            return pid
    raise AssertionError(f"no worker with rank {rank}")


def kill_worker(proc: subprocess.Popen, rank: int = 1) -> None:
    """kill -9 the worker of `rank` that torchrun (proc) started."""
    os.kill(worker_pid(proc, rank), signal.SIGKILL)


def send_when_step(proc: subprocess.Popen, run_dir: Path, sig: int, min_step: int, group: bool = False) -> None:
    """Send `sig` to proc (or, like Slurm's scancel, to its whole process group) once metrics.jsonl shows a
    step >= min_step."""
    wait_for(lambda: any(r.get("step", 0) >= min_step for r in metrics(run_dir)) or proc.poll() is not None,
             what=f"step {min_step}")
    assert proc.poll() is None, f"run ended before step {min_step}: {proc.communicate()}"
    os.killpg(proc.pid, sig) if group else proc.send_signal(sig)

