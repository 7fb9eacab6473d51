"""Gradient averaging through shared memory, for CPU ranks that all run on one host.

Gloo's all_reduce of the MLP's gradients costs several times the step's compute on a small CPU host:
each call hands work between gloo's threads and through loopback TCP, and every hand-off waits for
the scheduler (bench/bench.py measures both). Here each rank's own thread does the whole exchange: it copies its
bucket into its slot of one shared block, publishes a sequence number, waits until every rank has
published the same number, and sums the slots in rank order. Every rank therefore gets bit-identical
averages, and two ranks get exactly what gloo gives ((a + b) / 2). DDP stays in charge of buckets,
hooks and parameter broadcast; this is only its comm hook.

Layout of the block: a 64-byte header per rank (sequence number, pid, arrival time of each half's call),
then two halves (used by
alternate calls, so a fast rank never overwrites a slot that a slow rank is still reading), each with
one slot of `numel` float32 per rank. The block is unlinked as soon as every rank has mapped it: no
file is left behind, however the job ends. Ordering relies on x86's store order (TSO); on other CPUs,
on several hosts or without /dev/shm, `attach` returns None and DDP uses the process group (gloo).
"""
from __future__ import annotations

import mmap
import os
import platform
import time

import torch
import torch.distributed as dist

from . import container
from .errors import UsageError, warn

HEADER = 64  # bytes per rank: one cache line, so ranks publishing their numbers do not contend
SHM_DIR = "/dev/shm"


class HostAllReduce:
    def __init__(self, block: mmap.mmap, rank: int, world_size: int, numel: int, timeout_s: float):
        self.block, self.rank, self.world_size, self.numel, self.timeout_s = block, rank, world_size, numel, timeout_s
        header = memoryview(block)[:HEADER * world_size].cast("q")  # 8 int64 per rank
        self.seqs = header[0::8]   # seqs[r]: how many buckets rank r has published
        self.pids = header[1::8]
        self.arrivals = (header[2::8], header[3::8])  # when each rank arrived at the call using half 0 / 1
        self.waited = 0.0  # seconds the other ranks kept this one waiting, since the last take_waited()
        self.slots = torch.frombuffer(block, dtype=torch.float32, offset=HEADER * world_size,
                                      count=2 * world_size * numel).view(2, world_size, numel)
        self.calls = 0

    def hook(self, _state, bucket):  # no annotations: DDP checks them against its own classes
        """DDP comm hook: replace the bucket's gradients (a dist.GradBucket) by their mean over all ranks."""
        done = torch.futures.Future()
        done.set_result(self.average(bucket.buffer()))
        return done

    def average(self, grads: torch.Tensor) -> torch.Tensor:
        """Replace `grads` (float32, at most `numel` values) by its mean over all ranks, in place."""
        rows = self.gather(grads)
        grads.copy_(rows[0])
        for r in range(1, self.world_size):  # the same order on every rank: bit-identical results
            grads.add_(rows[r])
        return grads.div_(self.world_size)

    def gather(self, values: torch.Tensor) -> torch.Tensor:
        """Every rank's `values` (float32, at most `numel`) as rows in rank order: a view of the shared
        block, valid until this rank's next call (no rank can overwrite it before then)."""
        n = values.numel()
        self.calls += 1
        half, arrivals = self.slots[self.calls % 2], self.arrivals[self.calls % 2]
        half[self.rank, :n].copy_(values)
        arrivals[self.rank] = time.monotonic_ns()
        self.seqs[self.rank] = self.calls  # publish after the copy: x86 keeps stores in order
        self.wait_for(self.calls)
        # from this rank's arrival to the last one's: time a rank spent frozen in the spin (a CPU quota, an
        # oversubscribed host) is its own slowness, not waiting for the others
        self.waited += (max(arrivals) - arrivals[self.rank]) / 1e9
        return half[:, :n]

    def take_waited(self) -> float:
        """Seconds the other ranks kept this one waiting since the last call (rank_timing's meter)."""
        waited, self.waited = self.waited, 0.0
        return waited

    def wait_for(self, calls: int) -> None:
        """Spin while the others are about to arrive (they compute on their own cores); after 2 ms
        yield the core (an oversubscribed host); every second check that the others still live."""
        start = time.perf_counter()
        next_check = start + 1.0
        while min(self.seqs) < calls:
            now = time.perf_counter()
            if now - start > 2e-3:
                os.sched_yield() if now - start < 0.1 else time.sleep(1e-3)
            if now > next_check:
                next_check = now + 1.0
                self.check_peers(now - start)

    def check_peers(self, waited_s: float) -> None:
        """Raise ConnectionError if a peer has exited (its launcher will end or restart the job)."""
        for r, pid in enumerate(self.pids):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                raise ConnectionError(
                    f"rank {r} (pid {pid}) exited while rank {self.rank} waited for its gradients"
                ) from None
            except PermissionError:
                pass  # alive, under another user
        if waited_s > self.timeout_s:
            raise ConnectionError(f"rank {self.rank} waited {waited_s:.0f} s for the other ranks' gradients")


def attach(rank: int, world_size: int, numel: int, timeout_s: float = 600) -> HostAllReduce | None:
    """Map one shared block on every rank, or return None on every rank when some rank cannot (another
    host, no /dev/shm or too little of it, a CPU without x86's store order). Every rank must call it."""
    # a random name that leaves torch's RNG alone: every rank's RNG must stay in step with rank 0's,
    # whose state the checkpoints save (the CNN's dropout draws from it)
    name = torch.tensor(list(os.urandom(16)) if rank == 0 else [0] * 16, dtype=torch.uint8)
    dist.broadcast(name, src=0)
    path = os.path.join(SHM_DIR, f"mnist-dist-{bytes(name.tolist()).hex()}")
    size = HEADER * world_size + 2 * world_size * numel * 4
    created = torch.tensor([1.0 if rank != 0 or create(path, size) else 0.0])
    if not created.item() and shm_full(SHM_DIR, size):  # rank 0 says why (all ranks share this host, if any)
        warn(container.shm_shortfall(SHM_DIR, size))
    dist.all_reduce(created, op=dist.ReduceOp.MIN)  # everyone learns whether rank 0 made the block
    block = open_block(path, size) if created.item() else None
    mapped = torch.tensor([0.0 if block is None else 1.0])
    dist.all_reduce(mapped, op=dist.ReduceOp.MIN)  # nobody opens the file after this: remove it
    if rank == 0 and created.item():
        os.unlink(path)
    if not mapped.item():
        if block is not None:
            block.close()
        return None
    shared = HostAllReduce(block, rank, world_size, numel, timeout_s)
    shared.pids[rank] = os.getpid()
    dist.barrier()  # every pid is written before anyone checks them
    return shared


def wanted(cpu_allreduce: str, rank: int, world_size: int, numel: int, device: torch.device,
           float32: bool = True) -> HostAllReduce | None:
    """The shared block for CPU ranks on one host unless told to use gloo; None for the process group
    (also for values other than float32, which the block cannot carry). --cpu-allreduce shm that the
    ranks cannot serve is refused (on every rank: each got the same answer)."""
    if device.type != "cpu":
        return None
    shared = attach(rank, world_size, numel) if cpu_allreduce != "gloo" and float32 else None
    if shared is None and cpu_allreduce == "shm":
        raise UsageError("--cpu-allreduce shm: the ranks cannot share memory (they must all run on one x86 "
                         "host with /dev/shm); use --cpu-allreduce auto or gloo", everywhere=True)
    return shared


def create(path: str, size: int) -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False  # the exchange relies on x86's store order
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError:
        return False
    try:
        os.posix_fallocate(fd, 0, size)  # a full /dev/shm fails here, not with SIGBUS later
        return True
    except OSError:
        os.unlink(path)
        return False
    finally:
        os.close(fd)


def shm_full(folder: str, size: int) -> bool:
    """Whether `folder` exists but has less than `size` bytes free (and not: another host, another CPU)."""
    free = container.free_bytes(folder)
    return free is not None and free < size


def open_block(path: str, size: int) -> mmap.mmap | None:
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return None  # not this host's /dev/shm
    try:
        return mmap.mmap(fd, size)
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)
