"""What the tests share: tiny MNIST-format data, running the job as a user would, reading its outputs,
and the checks several files make (bitwise-equal models, polling)."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
REAL_DATA = os.environ.get("MNIST_DATA_DIR", "")

# the small runs most tests interrupt or compare: batches of 8 images, a record every 10 steps
SMALL_RUN = ("--batch-size", "8", "--log-every", "10", "--seed", "5")


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
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
            struct.pack(">IIII", 2051, n, 28, 28) + images.numpy().tobytes()
        )
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(
            struct.pack(">II", 2049, n) + labels.to(torch.uint8).numpy().tobytes()
        )


def job_env(**extra: str) -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_", "SLURM_", "TORCHELASTIC"))
    }
    env.update({"WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
    env.update(extra)
    env = {k: v for k, v in env.items() if v != ""}  # an empty value means: unset it
    return {**env, "CUDA_VISIBLE_DEVICES": ""}  # but this one: empty hides every GPU


def train_cmd(nproc: int, *flags: str, restarts: int = 0) -> list[str]:
    """`python -m mnist_dist.train` for one process, torchrun for several (as the README says)."""
    if nproc == 1 and not restarts:
        return [sys.executable, "-m", "mnist_dist.train", *flags]
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
        f"--max-restarts={restarts}", "-m", "mnist_dist.train", *flags,
    ]


def run_train(
    nproc: int, data: Path, run_dir: Path, *flags: str, timeout: float = 180, env: dict | None = None, restarts: int = 0
) -> subprocess.CompletedProcess:
    cmd = train_cmd(
        nproc, "--data-dir", str(data), "--run-dir", str(run_dir), "--no-verify-data", "--no-download", *flags,
        restarts=restarts,
    )
    return subprocess.run(cmd, cwd=ROOT, env=env or job_env(), capture_output=True, text=True, timeout=timeout)


STARTED: list[subprocess.Popen] = []


def start_train(nproc: int, data: Path, run_dir: Path, *flags: str, restarts: int = 0,
                env: dict | None = None) -> subprocess.Popen:
    """A training run in the background, in its own process group (killed after the test if still alive)."""
    cmd = train_cmd(
        nproc, "--data-dir", str(data), "--run-dir", str(run_dir), "--no-verify-data", "--no-download", *flags,
        restarts=restarts,
    )
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env or job_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )
    STARTED.append(proc)
    return proc


def wait_for(predicate, timeout: float = 60, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what}")


def metrics(run_dir: Path) -> list[dict]:
    """The run's records so far; a last line the job is still writing is left out."""
    path = run_dir / "metrics.jsonl"
    text = path.read_text() if path.exists() else ""
    complete = text[:text.rfind("\n") + 1]
    return [json.loads(line) for line in complete.splitlines()]


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def params(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, weights_only=True)["model"]


def final_ckpt(run_dir: Path) -> Path:
    return sorted((run_dir / "checkpoints").glob("ckpt-*.pt"))[-1]


def children(proc: subprocess.Popen) -> list[int]:
    """The pids of proc's child processes (torchrun's workers, or rank 0's W&B process)."""
    return [
        int(pid)
        for pid in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    ]


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



def cpu_quota_unavailable() -> str | None:
    """Why a process cannot be held to a CPU quota here (None: it can)."""
    v1, v2 = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"), Path("/sys/fs/cgroup/cgroup.controllers")
    if v1.exists():
        return None if os.access(v1.parent, os.W_OK) else "cgroup v1's cpu hierarchy is not writable"
    if v2.exists() and "cpu" in v2.read_text().split():
        return None if os.access(v2.parent, os.W_OK) else "the cgroup v2 root is not writable"
    return "no cgroup cpu controller (v1 cpu.cfs_quota_us or v2 cpu.max)"


@contextlib.contextmanager
def cpu_quota(pid: int, share: float):
    """Hold process `pid` (all its threads) to `share` of one CPU, as a throttled or noisy node would be:
    a cgroup with a CFS quota (v1 cpu.cfs_quota_us, or v2 cpu.max). Yields a function that lifts the
    quota; the cgroup is removed at the end, also on failure."""
    v1 = Path("/sys/fs/cgroup/cpu")
    root = v1 if (v1 / "cpu.cfs_quota_us").exists() else Path("/sys/fs/cgroup")
    group = root / f"mnist-dist-test-{os.getpid()}-{pid}"
    group.mkdir()
    quota = str(int(share * 100_000))
    try:
        if root == v1:
            (group / "cpu.cfs_period_us").write_text("100000")
            (group / "cpu.cfs_quota_us").write_text(quota)
        else:
            with contextlib.suppress(OSError):  # a child of the root gets the cpu controller only when asked
                (root / "cgroup.subtree_control").write_text("+cpu")
            (group / "cpu.max").write_text(f"{quota} 100000")
        (group / "cgroup.procs").write_text(str(pid))

        def lift() -> None:
            for member in (group / "cgroup.procs").read_text().split():
                with contextlib.suppress(OSError):  # exited meanwhile
                    (root / "cgroup.procs").write_text(member)
        yield lift
    finally:
        lift()
        group.rmdir()


def assert_same_params(run: Path, reference: Path) -> None:
    """The newest checkpoints of two run dirs hold bitwise the same parameters."""
    p, q = params(final_ckpt(run)), params(final_ckpt(reference))
    assert p.keys() == q.keys() and all(torch.equal(p[k], q[k]) for k in p), \
        f"the parameters of {run} are not bitwise equal to those of {reference}"


def kick_requeued(env: dict, job_id: str, until, settle_s: float = 3, run=subprocess.run) -> None:
    """Skip Slurm's 2-minute BeginTime delay after a requeue (from outside the job, as on a cluster),
    once the old incarnation has had `settle_s` seconds to clean up (a restart within ~0.2 s of the
    requeue can hit "Job credential revoked" and fail the job). `run`: how a command reaches the
    cluster (a login host's Host.run on separate hosts)."""
    pending_since = None
    while not until():
        out = run(["scontrol", "show", "job", job_id, "-o"], env=env, capture_output=True, text=True).stdout
        if "JobState=PENDING" in out and "Reason=BeginTime" in out:
            pending_since = pending_since or time.monotonic()
            if time.monotonic() - pending_since >= settle_s:
                run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], env=env, check=True)
                pending_since = None
        time.sleep(0.5)


def slurm_log(folder: Path, job_id: str) -> str:
    """A Slurm job's log, written by sbatch --output=FOLDER/%x-%j.out (appended across requeues)."""
    return "".join(p.read_text() for p in Path(folder).glob(f"*-{job_id}.out"))


def follow_requeued(env: dict, folder: Path, job_id: str, timeout: float = 300, run=subprocess.run) -> str:
    """Follow a Slurm job through its requeues (started at once by kick_requeued) until its log says it
    exited 0; the log. `run`: as for kick_requeued."""
    finished = lambda: "] exit 0" in slurm_log(folder, job_id)  # noqa: E731
    threading.Thread(target=kick_requeued, args=(env, job_id, finished), kwargs={"run": run}, daemon=True).start()
    try:
        wait_for(finished, timeout=timeout, what=f"job {job_id} to finish")
    except AssertionError as err:
        raise AssertionError(f"{err}; its log:\n{slurm_log(folder, job_id)[-3000:]}") from None
    return slurm_log(folder, job_id)
