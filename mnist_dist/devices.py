"""Which device a rank trains on, and the GPU checks and settings: one GPU per rank, deterministic kernels."""
from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist

from .errors import UsageError


def check_device(requested: str) -> None:
    if requested == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was requested but no CUDA GPU is visible (use --device cpu or auto)")


def pick_device(requested: str, local_rank: int) -> torch.device:
    """cuda:LOCAL_RANK when asked for and visible, else the CPU (check_device reports a bad request).

    A task that sees one GPU (srun --gpus-per-task=1, or CUDA_VISIBLE_DEVICES set per rank) takes that
    one; ranks that would share a GPU are refused by `check_own_gpus`, before NCCL fails on them."""
    if requested in ("cuda", "auto") and torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def check_own_gpus(store: dist.Store, rank: int, world_size: int, device: torch.device) -> None:
    """Refuse, on every rank alike, ranks that would share one GPU (more ranks on a node than GPUs):
    NCCL would fail at its first collective with a traceback ("Duplicate GPU detected")."""
    uuid = str(torch.cuda.get_device_properties(device).uuid)
    store.set(f"gpu/{rank}", f"{socket.gethostname()} {device.index} {uuid}")
    keys = [f"gpu/{r}" for r in range(world_size)]
    store.wait(keys)
    gpus = [value.decode().split(" ", 2) for value in store.multi_get(keys)]  # host, index, uuid per rank
    seen: dict[str, list[int]] = {}
    for r, (_, _, gpu) in enumerate(gpus):
        seen.setdefault(gpu, []).append(r)
    shared = next((ranks for ranks in seen.values() if len(ranks) > 1), None)
    if shared:
        host, index, _ = gpus[shared[0]]
        raise UsageError(f"ranks {', '.join(map(str, shared))} would share GPU {index} on {host}: more ranks on a "
                         f"node than GPUs visible to them ({torch.cuda.device_count()} here); start one rank per GPU "
                         f"(torchrun --nproc-per-node, srun --ntasks-per-node or --gpus-per-task, submit.py "
                         f"--ntasks-per-node no larger than --gpus-per-node), or train on the CPU with --device cpu",
                         everywhere=True)


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
