"""Each rank's seconds of its own work (compute) and of waiting for the others (wait), per log interval.

With DDP, backward ends at the same moment on every rank (the gradient exchange waits for the slowest),
so backward's length cannot find a slow rank. What differs is where each rank spends the step: a slow
rank computes long and finds the others ready; the others hand in their gradients and wait. So the
exchange itself is timed: from the moment the last gradient bucket reaches the comm hook (this rank's
backward is done) to the moment backward returns (DDP has waited for every bucket), and likewise
around --exact's exchange. Compute is the rest of the interval. The slow rank is the one that waits least.

No extra synchronisation: the two figures of every rank ride on the sync point's all_reduce (`slots`),
and on a GPU the waits are CUDA events read once per interval, when the sync point waits for the GPU
anyway; never a synchronize per step.
"""
from __future__ import annotations

import socket
import time
from collections.abc import Callable

import torch
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from .distributed import all_gather_json
from .host_allreduce import HostAllReduce


class HostClock:
    """Waits timed on the host: a CPU rank does the exchange on its own thread."""

    def __init__(self) -> None:
        self.waited = 0.0

    def begin(self) -> None: ...

    def interval_s(self, host_s: float) -> float:
        return host_s

    def mark(self) -> float:
        return time.perf_counter()

    def add(self, start: float, end: float) -> None:
        self.waited += end - start

    def take_waited(self) -> float:
        waited, self.waited = self.waited, 0.0
        return waited


class CudaClock:
    """Waits timed on the GPU's stream: an event when the last bucket is handed over, one when the
    stream may go on (DDP makes it wait for NCCL's). The interval itself is timed on the stream too: the
    host runs ahead of the GPU by up to a whole interval (no step waits for it). Read when the interval's
    work is done."""

    def __init__(self) -> None:
        self.pairs: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self.start: torch.cuda.Event | None = None
        self.spare: list[torch.cuda.Event] = []  # read events, recorded again (none made per step once warm)

    def begin(self) -> None:
        self.start = self.mark()

    def interval_s(self, host_s: float) -> float:
        """The GPU's seconds from begin() to now. Waits for the stream to get here: the interval's one
        synchronize, where the sync point waits anyway; take_waited() reads the events after it."""
        end = self.mark()
        end.synchronize()
        seconds = self.start.elapsed_time(end) / 1000 if self.start is not None else host_s
        self.spare += [end] if self.start is None else [self.start, end]
        self.start = None
        return seconds

    def mark(self) -> torch.cuda.Event:
        event = self.spare.pop() if self.spare else torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def add(self, start: torch.cuda.Event, end: torch.cuda.Event) -> None:
        self.pairs.append((start, end))

    def take_waited(self) -> float:
        """After interval_s(), which waited for every event recorded so far."""
        waited = sum(start.elapsed_time(end) for start, end in self.pairs) / 1000  # ms -> s
        self.spare += [event for pair in self.pairs for event in pair]
        self.pairs.clear()
        return waited


class RankTiming:
    """This rank's clock: wraps the gradient exchange, and hands over (compute, wait) per interval."""

    def __init__(self, device: torch.device, world_size: int, rank: int):
        self.clock = CudaClock() if device.type == "cuda" else HostClock()
        self.meter = self.clock  # what says how long this rank waited: the clock, or the shared-memory block
        self.device, self.world_size, self.rank = device, world_size, rank
        self.handed_over = None  # the mark taken when the last bucket reached the exchange

    @staticmethod
    def wanted(on: bool, device: torch.device, world_size: int, rank: int) -> RankTiming | NoTiming:
        return RankTiming(device, world_size, rank) if on else NoTiming(device, world_size, rank)

    def hook(self, inner: Callable | None, shared: HostAllReduce | None = None) -> Callable | None:
        """A DDP comm hook that notes when each bucket arrives (the last one: backward is done here) and
        then runs `inner`, the hook that exchanges it (None: torch's plain all_reduce hook, what DDP does
        without one). The shared-memory block (`shared`) times its own waits: it knows when each rank arrived."""
        if shared is not None:
            self.meter = shared
            return inner
        inner = inner or default_hooks.allreduce_hook

        def timed(state, bucket):
            self.handed_over = self.clock.mark()
            return inner(state, bucket)
        return timed

    def after_backward(self) -> None:
        """Backward has returned: DDP waited for every bucket's exchange."""
        if self.handed_over is not None:
            self.clock.add(self.handed_over, self.clock.mark())
            self.handed_over = None

    def timed(self, exchange: Callable, shared: HostAllReduce | None = None) -> Callable:
        """`exchange` (a collective the step waits for, as --exact's exchange) with its time counted as waiting
        (the shared-memory block times its own, as above)."""
        if shared is not None:
            self.meter = shared
            return exchange

        def call(*args, **kwargs):
            start = self.clock.mark()
            result = exchange(*args, **kwargs)
            self.clock.add(start, self.clock.mark())
            return result
        return call

    def begin(self) -> None:
        """An interval starts (the loop's clock restarts: after the sync point, a checkpoint, an evaluation)."""
        self.clock.begin()

    def slots(self, interval_s: float) -> torch.Tensor:
        """2 x world_size numbers for the sync point's all_reduce (a sum): this rank's compute and wait
        seconds of the interval (`interval_s` on the host's clock) in its own slots, zeros elsewhere."""
        interval_s = self.clock.interval_s(interval_s)
        waited = self.meter.take_waited()
        out = torch.zeros(2 * self.world_size)
        out[self.rank], out[self.world_size + self.rank] = max(interval_s - waited, 0.0), waited
        return out.to(self.device)


class NoTiming(RankTiming):
    """--straggler-factor 0: nothing timed, nothing added to the sync point."""

    def hook(self, inner: Callable | None, shared: HostAllReduce | None = None) -> Callable | None:
        return inner

    def after_backward(self) -> None: ...

    def begin(self) -> None: ...

    def timed(self, exchange: Callable, shared: HostAllReduce | None = None) -> Callable:
        return exchange

    def slots(self, interval_s: float) -> torch.Tensor:
        return torch.zeros(0, device=self.device)


def split(summed: list[float], world_size: int) -> tuple[list[float], list[float]]:
    """The all-reduced slots: (compute seconds, wait seconds), each a list indexed by rank."""
    return summed[:world_size], summed[world_size:2 * world_size]


def gather_hosts(world_size: int, device: torch.device) -> list[str]:
    """Every rank's host name, indexed by rank."""
    return all_gather_json(socket.gethostname(), world_size, device=device)
