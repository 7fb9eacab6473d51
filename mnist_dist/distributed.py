"""Distributed set-up: read the launcher's environment once, start and stop the process group.

Every launcher ends here: torchrun and submitit set RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/
MASTER_PORT; a plain `srun python -m mnist_dist.train` sets only Slurm's variables, from which the
same values are derived; a plain `python -m mnist_dist.train` is world size 1 on 127.0.0.1.
"""
from __future__ import annotations

import datetime
import gc
import io
import os
import re
import socket
import sys
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
import torch.distributed as dist

from .config import UsageError, print_error


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int
    restart: int = 0            # torchrun's restart round (TORCHELASTIC_RESTART_COUNT)
    agent_store: bool = False   # torchrun's agent already serves the store at master_addr:master_port
    job_id: str = ""            # the Slurm job (SLURM_JOB_ID), where there is one

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        return self.local_rank == 0


def first_host(nodelist: str) -> str:
    """First host name of a Slurm hostlist: 'gpu[003-005,009],cpu1' -> 'gpu003'."""
    m = re.match(r"([^,\[]+)(?:\[([^\],-]+))?", nodelist.strip())
    if not m:
        raise UsageError(f"cannot parse SLURM_JOB_NODELIST {nodelist!r}")
    return m.group(1) + (m.group(2) or "")


def slurm_port(job_id: str) -> int:
    """A rendezvous port derived from the job id, so two jobs sharing a node do not collide."""
    return 20000 + int(re.sub(r"\D", "", job_id) or 0) % 20000


def read_env(environ: Mapping[str, str] = os.environ) -> DistEnv:
    """The one place that reads the launcher's variables (torchrun/submitit first, then srun)."""
    job = environ.get("SLURM_JOB_ID", "")
    if "RANK" in environ and "WORLD_SIZE" in environ:
        get = environ.get
        return DistEnv(int(get("RANK")), int(get("LOCAL_RANK", get("RANK"))), int(get("WORLD_SIZE")),
                       get("MASTER_ADDR", "127.0.0.1"), int(get("MASTER_PORT", "29500")),
                       int(get("TORCHELASTIC_RESTART_COUNT", "0")), get("TORCHELASTIC_USE_AGENT_STORE") == "True", job)
    if "SLURM_STEP_NUM_TASKS" in environ:  # inside an srun step: each task is one rank
        return DistEnv(int(environ["SLURM_PROCID"]), int(environ["SLURM_LOCALID"]),
                       int(environ["SLURM_STEP_NUM_TASKS"]),
                       environ.get("MASTER_ADDR") or first_host(environ["SLURM_JOB_NODELIST"]),
                       int(environ.get("MASTER_PORT") or slurm_port(job or "0")), job_id=job)
    return DistEnv(0, 0, 1, "127.0.0.1", free_port(), job_id=job)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_device(requested: str) -> None:
    if requested == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was requested but no CUDA GPU is visible (use --device cpu or auto)")


def pick_device(requested: str, local_rank: int) -> torch.device:
    """cuda:LOCAL_RANK when asked for and visible, else the CPU (check_device reports a bad request).

    A task that sees one GPU (srun --gpus-per-task=1, or CUDA_VISIBLE_DEVICES set per rank) takes that
    one; ranks that would share a GPU are refused in `init`, before NCCL fails on them."""
    if requested in ("cuda", "auto") and torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


STARTUP_TIMEOUT_S = 600  # rendezvous, download and W&B start-up: the limit before the first step


def init(env: DistEnv, device: torch.device, hang_timeout_s: float = 0) -> None:
    """Join the process group: nccl for GPUs, gloo for CPU. World size 1 takes the same path.

    The collectives' own timeout (NCCL's watchdog aborts at it) is the start-up limit, or longer than
    --hang-timeout, so that the hang watchdog, which names the stuck rank, always speaks first."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=max(STARTUP_TIMEOUT_S, hang_timeout_s + 60))
    store = dist.TCPStore(env.master_addr, env.master_port, env.world_size, timeout=timeout,
                          is_master=env.rank == 0 and not env.agent_store)
    # each torchrun restart round gets its own key space: after a worker died, the restarted group
    # must not read the dead group's addresses (gloo would try them and fail to connect)
    store = dist.PrefixStore(f"mnist-dist/attempt-{env.restart}", store)
    if device.type == "cuda":
        check_own_gpus(store, env, device)
    dist.init_process_group(backend, store=store, rank=env.rank, world_size=env.world_size, timeout=timeout,
                            device_id=device if device.type == "cuda" else None)


def check_own_gpus(store: dist.Store, env: DistEnv, device: torch.device) -> None:
    """Refuse, on every rank alike, ranks that would share one GPU (more ranks on a node than GPUs):
    NCCL would fail at its first collective with a traceback ("Duplicate GPU detected")."""
    uuid = str(torch.cuda.get_device_properties(device).uuid)
    store.set(f"gpu/{env.rank}", f"{socket.gethostname()} {device.index} {uuid}")
    keys = [f"gpu/{r}" for r in range(env.world_size)]
    store.wait(keys)
    gpus = [value.decode().split(" ", 2) for value in store.multi_get(keys)]  # host, index, uuid per rank
    seen: dict[str, list[int]] = {}
    for rank, (_, _, gpu) in enumerate(gpus):
        seen.setdefault(gpu, []).append(rank)
    shared = next((ranks for ranks in seen.values() if len(ranks) > 1), None)
    if shared:
        host, index, _ = gpus[shared[0]]
        raise UsageError(f"ranks {', '.join(map(str, shared))} would share GPU {index} on {host}: more ranks on a "
                         f"node than GPUs visible to them ({torch.cuda.device_count()} here); start one rank per GPU "
                         f"(torchrun --nproc-per-node, srun --ntasks-per-node or --gpus-per-task, submit.py "
                         f"--ntasks-per-node no larger than --gpus-per-node), or train on the CPU with --device cpu")


def make_deterministic(device: torch.device, on: bool) -> None:
    """--deterministic: GPU kernels that give the same bits every run (cuDNN's deterministic
    convolutions, no autotuning, a fixed cuBLAS workspace), so a resumed CNN equals an uninterrupted
    run on GPUs too. CPU kernels here are deterministic already; nothing changes there."""
    if device.type != "cuda" or not on:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts: before any matmul
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)


def shutdown(clean: bool) -> None:
    """Leave the process group. DDP's reducer sits in reference cycles that hold gloo work objects;
    freed only at interpreter exit they can abort the process (SIGABRT), so collect them first. After
    a clean run every rank waits for the others, so no rank tears down a connection still in use."""
    if dist.is_initialized():
        if dist.get_world_size() > 1:  # only then was there a DDP reducer (gc takes ~0.2 s here)
            gc.collect()
        if clean:
            dist.barrier()
        dist.destroy_process_group()


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few numbers over all ranks (every rank must call it). Host-device sync point."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def broadcast_from_main(values: list[float], device: torch.device) -> list[float]:
    """Rank 0's numbers on every rank (every rank must call it). Host-device sync point."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.broadcast(t, src=0)
    return t.tolist()


def broadcast_object(obj: Any, is_main: bool, device: torch.device) -> Any:
    """Rank 0's dict of tensors and numbers (a checkpoint, a config) on every rank. Serialised with
    torch.save and read back with weights_only=True: nothing that arrives can run code."""
    payload = b""
    if is_main:
        buf = io.BytesIO()
        torch.save(obj, buf)
        payload = buf.getvalue()
    size = int(broadcast_from_main([float(len(payload))], device)[0])
    data = (torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(device) if is_main
            else torch.empty(size, dtype=torch.uint8, device=device))
    dist.broadcast(data, src=0)
    return torch.load(io.BytesIO(data.cpu().numpy().tobytes()), weights_only=True)


class PeerFailed(UsageError):
    """Another rank failed a check and printed why; this rank stops too."""


def agree(fn: Callable[[], Any], run_here: bool, is_main: bool, device: torch.device) -> Any:
    """Run `fn` on the ranks that should; if it fails anywhere, every rank raises (nobody hangs).

    Every rank calls this, so the all_reduce inside is never skipped by a rank.
    """
    result, error = None, None
    if run_here:
        try:
            result = fn()
        except UsageError as err:
            error = err
    failed, main_failed = all_sum([1.0 if error else 0.0, 1.0 if error and is_main else 0.0], device)
    if error and not main_failed:  # rank 0 does not know this one: say it here
        print_error(error)
    if error:
        raise error
    if failed:
        raise PeerFailed("another rank failed a check (its error is above)")
    return result


def wrap_ddp(model: torch.nn.Module, device: torch.device, env: DistEnv, cpu_allreduce: str = "auto",
             ) -> tuple[torch.nn.Module, str]:
    """DistributedDataParallel around `model` (it averages the gradients over the ranks in backward),
    and how the gradients are averaged, in words.

    With one rank there is nothing to average, so the model is used as it is: DDP's hooks would cost
    ~70 ms of the MLP's ~0.3 s epoch on a CPU. The training loop is the same either way. CPU ranks
    that share one host average through shared memory (`host_allreduce`) unless told to use gloo.
    """
    if env.world_size == 1:
        return model, "no gradients to average"
    from torch.nn.parallel import DistributedDataParallel as DDP

    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    if device.type == "cuda":
        return ddp, "gradients averaged by nccl all_reduce"
    if cpu_allreduce != "gloo" and all(p.dtype == torch.float32 for p in model.parameters()):
        from .host_allreduce import attach

        shared = attach(env.rank, env.world_size, sum(p.numel() for p in model.parameters()))
        if shared:
            ddp.register_comm_hook(None, shared.hook)
            return ddp, "gradients averaged through shared memory (all ranks on this host)"
    if cpu_allreduce == "shm":  # every rank got the same answer from attach(): all stop here together
        raise UsageError("--cpu-allreduce shm: the ranks cannot share memory (they must all run on one x86 "
                         "host with /dev/shm); use --cpu-allreduce auto or gloo")
    return ddp, "gradients averaged by gloo all_reduce"


def exit_process(code: int) -> None:
    """End a training process without interpreter finalization. Gloo's worker threads can still hold
    objects that finalization destroys, which aborts the process now and then ("terminate called
    without an active exception", SIGABRT) after a run that succeeded; everything of ours is already
    flushed and closed by now."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
