"""Why a job is slow, said in one line per episode: a rank slower than the others (a straggler), or a
link that every rank waits for (communication-bound). Judged from every rank's compute and wait of each
log interval (rank_timing.py); every rank holds the same figures and judges alike, rank 0's tracker says
it. A line when an episode starts and one when it ends, each also an event record (metrics.jsonl, W&B):
never a line per interval. A condition must hold for `PERSIST` intervals in a row, each at least
`MIN_INTERVAL_S` long (shorter log intervals are judged together), so that a healthy run on a noisy
machine, where the scheduler stalls one rank or another for a few milliseconds, names nobody.
"""
from __future__ import annotations

import os
import statistics
from collections.abc import Callable
from dataclasses import dataclass

PERSIST = 2            # consecutive intervals before an episode starts or ends
MIN_INTERVAL_S = 1.0   # log intervals are judged together until they last this long
BOUND_FROM = 0.5       # every rank waits for the exchange at least this share of each step: communication-bound
BOUND_UNTIL = 0.4      # ... and the episode ends once some rank waits less than this


@dataclass
class Event:
    record: dict  # for metrics.jsonl: {"event": ..., figures, "message": line}
    line: str     # what rank 0 prints after "mnist-dist: <level>: "
    level: str    # "warning" or "note"


@dataclass
class Interval:
    """One log interval's figures, lists indexed by rank."""
    steps: int
    compute_s: list[float]
    wait_s: list[float]

    def __add__(self, other: Interval) -> Interval:
        return Interval(self.steps + other.steps, [a + b for a, b in zip(self.compute_s, other.compute_s, strict=True)],
                        [a + b for a, b in zip(self.wait_s, other.wait_s, strict=True)])

    @property
    def seconds(self) -> float:
        return max(c + w for c, w in zip(self.compute_s, self.wait_s, strict=True))

    def as_record(self) -> dict:
        """For the interval's metrics.jsonl record (nothing when per-rank timing is off)."""
        if not self.compute_s:
            return {}
        return {"interval_steps": self.steps, "rank_compute_s": self.compute_s, "rank_wait_s": self.wait_s}

    def ms_per_step(self, seconds: list[float]) -> list[float]:
        return [1000 * s / self.steps for s in seconds]

    def wait_share(self) -> list[float]:
        return [w / max(c + w, 1e-12) for c, w in zip(self.compute_s, self.wait_s, strict=True)]


class SlowdownWatch:
    """Episodes of a straggler and of a communication-bound exchange, from one interval to the next.

    factor: a rank whose compute per step is at least `factor` times the median rank's is slow (0: off).
    link: where the exchange travels ("eth0", "nccl"), or None where waiting is no sign of a slow link (CPU
    ranks on one host, where it is the scheduler's doing); bus_bytes: what each rank sends and receives
    per step (nccl-tests' bus bytes: 2(W-1)/W of the gradient for an all_reduce); payload_bytes: the
    gradient's size."""

    def __init__(self, factor: float, hosts: list[str], link: str | None = None, payload_bytes: int = 0,
                 bus_bytes: int = 0, bytes_at: Callable[[int], tuple[int, int]] | None = None,
                 compressed: bool = False):
        self.factor, self.hosts, self.link = factor, hosts, link
        self.fewer_bytes = "" if compressed else "fewer bytes per step (--grad-compression powersgd, or fp16), "
        # (payload, bus) bytes per step at a step: PowerSGD sends the whole gradient before its start step
        self.bytes_at = bytes_at or (lambda step: (payload_bytes, bus_bytes))
        self.straggler: int | None = None  # the rank named slow, until it recovers
        self.suspect, self.streak = None, 0  # the rank that looked slow, and for how many intervals
        self.bound, self.bound_streak = False, 0
        self.pending: Interval | None = None  # log intervals not judged yet: together shorter than MIN_INTERVAL_S

    def judge(self, step: int, epoch: int, interval: Interval) -> list[Event]:
        if not self.factor or interval.steps <= 0 or len(interval.compute_s) < 2:
            return []
        self.pending = interval if self.pending is None else self.pending + interval
        if self.pending.seconds < MIN_INTERVAL_S:
            return []
        interval, self.pending = self.pending, None
        events = [e for e in (self.judge_straggler(interval), self.judge_link(interval, *self.bytes_at(step))) if e]
        for e in events:
            e.record.update({"step": step, "epoch": epoch, "message": e.line})
        return events

    # --- a slow rank --------------------------------------------------------------------------------
    def judge_straggler(self, iv: Interval) -> Event | None:
        compute = iv.ms_per_step(iv.compute_s)
        median = statistics.median(compute)
        slowest = max(range(len(compute)), key=compute.__getitem__)
        watched = self.straggler if self.straggler is not None else slowest
        slow = compute[watched] >= self.factor * median
        if self.straggler is None:  # counting towards naming one
            self.streak = self.streak + 1 if slow and watched == self.suspect else int(slow)
            self.suspect = watched if slow else None
            if self.streak < PERSIST:
                return None
            self.straggler, self.streak = watched, 0
            return self.straggler_event(iv, watched, compute, median)
        self.streak = 0 if slow else self.streak + 1  # counting towards its recovery
        if self.streak < PERSIST:
            return None
        self.straggler = self.suspect = None
        self.streak = 0
        line = (f"rank {watched} on {self.hosts[watched]} keeps pace again (compute {ms(compute[watched])} ms/step "
                f"vs the median rank's {ms(median)} ms)")
        return Event({"event": "straggler_recovered", "rank": watched, "host": self.hosts[watched]}, line, "note")

    def straggler_event(self, iv: Interval, rank: int, compute: list[float], median: float) -> Event:
        ratio = compute[rank] / max(median, 1e-9)
        share = iv.wait_share()
        others = statistics.mean(s for r, s in enumerate(share) if r != rank)
        line = (f"rank {rank} on {self.hosts[rank]} is {ratio:.1f}x slower than the median rank (compute "
                f"{ms(compute[rank])} ms/step vs {ms(median)} ms); the other ranks wait for it {others:.0%} of "
                f"each step")
        return Event({"event": "straggler", "rank": rank, "host": self.hosts[rank], "slowdown": round(ratio, 2),
                      "compute_ms_per_step": round(compute[rank], 3), "median_ms_per_step": round(median, 3),
                      "others_wait_share": round(others, 3)}, line, "warning")

    # --- a slow link --------------------------------------------------------------------------------
    def judge_link(self, iv: Interval, payload_bytes: int, bus_bytes: int) -> Event | None:
        if self.link is None:
            return None
        share = iv.wait_share()
        waiting = min(share) >= BOUND_FROM and self.straggler is None
        if self.bound == waiting or (self.bound and min(share) >= BOUND_UNTIL):
            self.bound_streak = 0
            return None
        self.bound_streak += 1
        if self.bound_streak < PERSIST:
            return None
        self.bound, self.bound_streak = not self.bound, 0
        mean_share = statistics.mean(share)
        if not self.bound:
            line = f"no longer communication-bound: {mean_share:.0%} of each step waits for the gradient exchange"
            return Event({"event": "communication_bound_ended", "wait_share": round(mean_share, 3)}, line, "note")
        wait_per_step = statistics.mean(iv.wait_s) / iv.steps
        rate = bus_bytes / max(wait_per_step, 1e-12) / 1e6
        line = (f"communication-bound: {mean_share:.0%} of each step waits for the gradient exchange "
                f"({payload_bytes / 1e6:.2f} MB per step at {rate:.1f} MB/s over {self.link}); what would help: "
                f"a faster interface, {self.fewer_bytes}or fewer exchanges per epoch (a larger --batch-size)")
        return Event({"event": "communication_bound", "wait_share": round(mean_share, 3),
                      "bus_mb_per_s": round(rate, 2), "mb_per_step": round(payload_bytes / 1e6, 3),
                      "link": self.link}, line, "note")


def link(device_type: str, hosts: list[str], through_shared_memory: bool, environ=os.environ) -> str | None:
    """Where the gradient exchange travels, for the communication-bound line: nccl (and its interface, if
    set), or the interface gloo uses between hosts; None for CPU ranks on one host."""
    if device_type == "cuda":
        return "nccl" + (f" ({environ['NCCL_SOCKET_IFNAME']})" if "NCCL_SOCKET_IFNAME" in environ else "")
    if len(set(hosts)) > 1 and not through_shared_memory:
        return environ.get("GLOO_SOCKET_IFNAME", "the network")
    return None


def bus_bytes(payload_bytes: int, world_size: int) -> int:
    """What each rank sends (and receives) per step in a ring schedule, or a reduce-scatter and all-gather:
    2(W-1)/W of the payload (nccl-tests' bus bandwidth rests on it)."""
    return payload_bytes * 2 * (world_size - 1) // world_size


def ms(value: float) -> str:
    return f"{value:.1f}" if value < 10 else f"{value:.0f}"
