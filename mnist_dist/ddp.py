"""DistributedDataParallel around the model, and how it averages the gradients over the ranks."""
from __future__ import annotations

from collections.abc import Callable

import torch

from .distributed import DistEnv
from . import host_allreduce


def wrap_ddp(model: torch.nn.Module, device: torch.device, env: DistEnv, cpu_allreduce: str = "auto",
             timed: Callable = lambda hook: hook) -> tuple[torch.nn.Module, str]:
    """The model to train (DDP around `model`, which averages the gradients in backward), and how the
    gradients are averaged, in words for the start-up line.

    With one rank there is nothing to average, so the model is used as it is (DDP's hooks would cost
    time and change nothing); the training loop is the same either way. CPU ranks that share one host
    average through shared memory (`host_allreduce`) unless told to use gloo. `timed` wraps the comm
    hook (None: DDP's own all_reduce) to time the exchange (rank_timing.RankTiming.hook).
    """
    if env.world_size == 1:
        return model, "no gradients to average"
    from torch.nn.parallel import DistributedDataParallel as DDP

    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    params = list(model.parameters())
    shared = host_allreduce.wanted(cpu_allreduce, env.rank, env.world_size, sum(p.numel() for p in params), device,
                                   float32=all(p.dtype == torch.float32 for p in params))
    hook = timed(shared.hook if shared else None, shared)
    if hook:
        ddp.register_comm_hook(None, hook)
    if shared:
        return ddp, "gradients averaged through shared memory (all ranks on this host)"
    return ddp, f"gradients averaged by {'nccl' if device.type == 'cuda' else 'gloo'} all_reduce"
