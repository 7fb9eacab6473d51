"""DistributedDataParallel around the model, and how it averages the gradients over the ranks."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import host_allreduce, slowdown
from .compression import Compression, mb
from .config import Config
from .distributed import DistEnv


@dataclass
class Exchange:
    """How the gradients travel each step: for the start-up line and the communication-bound note."""

    how: str                    # in words
    payload_bytes: int = 0      # what each rank hands in per step
    sent_bytes: int = 0         # what each rank sends per step (2(W-1)/W of the payload in a ring)
    shared_memory: bool = False  # CPU ranks of one host: no link to judge
    full_until: int = 0         # before this step the whole gradient travels (PowerSGD's plain start)
    full_bytes: tuple[int, int] = (0, 0)

    def at(self, step: int) -> tuple[int, int]:
        """(payload, sent) bytes per step around training step `step`."""
        return self.full_bytes if step < self.full_until else (self.payload_bytes, self.sent_bytes)


def wrap_ddp(model: torch.nn.Module, device: torch.device, env: DistEnv, cfg: Config, compression: Compression,
             timed: Callable = lambda hook, shared=None: hook) -> tuple[torch.nn.Module, Exchange]:
    """The model to train (DDP around `model`, which averages the gradients in backward), and how.

    With one rank there is nothing to average, so the model is used as it is (DDP's hooks would cost
    time and change nothing); the training loop is the same either way. CPU ranks that share one host
    average through shared memory (`host_allreduce`) unless told to use gloo or to compress; otherwise
    the process group all-reduces, through `compression`'s DDP comm hook if any. `timed` wraps the hook
    (None: DDP's own all_reduce) to time the exchange (rank_timing.RankTiming.hook).
    """
    W = env.world_size
    if W == 1:
        return model, Exchange("no gradients to average")
    from torch.nn.parallel import DistributedDataParallel as DDP

    params = list(model.parameters())
    # PowerSGD's hook chains three all_reduces per bucket, the later ones from the process group's callback
    # threads: two buckets' chains would interleave in another order on each rank (a hang). One bucket.
    one_bucket = {"bucket_cap_mb": compression.full_bytes / 2**20 + 1} if compression.stateful else {}
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, **one_bucket)
    shared = None
    if cfg.grad_compression == "none":
        shared = host_allreduce.wanted(cfg.cpu_allreduce, env.rank, W, sum(p.numel() for p in params), device,
                                       float32=all(p.dtype == torch.float32 for p in params))
    hook = timed(shared.hook if shared else compression.hook, shared)
    if hook:
        ddp.register_comm_hook(None, hook)
    full = (compression.full_bytes, slowdown.bus_bytes(compression.full_bytes, W))
    if shared:
        return ddp, Exchange(f"gradients averaged through shared memory (all ranks on this host), "
                             f"{compression.describe()}", *full, shared_memory=True)
    sent = slowdown.bus_bytes(compression.payload_bytes, W)
    how = (f"gradients averaged by {'nccl' if device.type == 'cuda' else 'gloo'} all_reduce, {compression.describe()}; "
           f"{mb(sent)} sent per rank per step")
    return ddp, Exchange(how, compression.payload_bytes, sent, full_until=compression.compresses_from,
                         full_bytes=full)
