"""The hang watchdog: a job whose ranks stop making progress ends within seconds, naming the culprits;
a rank that fails stops the others at once.

    mnist-dist train --hang-timeout 300     # the default; 0 turns the hang check off

Progress is a per-rank counter that training steps, evaluation batches and checkpoint bytes written
advance (`made_progress`): a slow but live phase (a long evaluation, a large checkpoint on a slow disk)
keeps counting. Every rank runs two daemon threads beside training:
- the reporter publishes, each second, this rank's heartbeat (a counter: the process is running),
  its progress and its step in the job's rendezvous store, and reads every rank's;
- the judge decides from what the reporter last heard, and never waits on the network itself:
  * once training has started (the first step), if no rank's progress moved for `hang_timeout` seconds,
    the job is hung. It names the ranks whose heartbeat stopped (a stopped or wedged process, a lost
    node); if every process still runs, the ranks that moved last (the others wait for them in a
    collective). Every live rank exits with EXIT_HUNG; a stopped rank on this host is killed, so that
    torchrun restarts the group at once instead of waiting 30 s for it to exit.
  * if a rank posted a failure (`abort`), every other rank exits at once with its exit code, instead of
    waiting in a collective for a peer that is gone (NCCL waits out its own timeout).
Before the first step (download, rendezvous, W&B start-up) the process group's start-up limit applies.
"""
from __future__ import annotations

import datetime
import os
import signal
import socket
import sys
import threading
import time

import torch.distributed as dist

from .distributed import DistEnv
from .preempt import EXIT_ERROR, EXIT_HUNG

STORE_LOST_S = 10.0  # the store refusing us this long: the process that served it has gone

_progress = 0  # this rank's progress so far
_step = 0


def made_progress(step: int | None = None) -> None:
    """Count one unit of progress (a step, an evaluation batch, a chunk written). Cheap enough for every step."""
    global _progress, _step
    _progress += 1
    if step is not None:
        _step = step


class PeerFailure(Exception):
    """This rank stops because another one failed or vanished: one line, and the failed rank's code."""

    def __init__(self, message: str, exit_code: int = EXIT_ERROR):
        super().__init__(message)
        self.exit_code = exit_code

    @classmethod
    def posted(cls, rank: int, posted: str) -> "PeerFailure":
        """From what a failed rank posted in the store ("code rank reason")."""
        code, failed, reason = posted.split(" ", 2)
        return cls(f"rank {rank} stops: rank {failed} failed ({reason})", int(code))


class Watchdog:
    def __init__(self, env: DistEnv, hang_timeout: float):
        self.rank, self.world_size, self.timeout = env.rank, env.world_size, hang_timeout
        self.interval = min(1.0, hang_timeout / 10) if hang_timeout else 1.0
        self.store_at = f"{env.master_addr}:{env.master_port}"
        self.host = socket.gethostname()
        # a connection of its own: a blocked read here never holds up the process group's
        client = dist.TCPStore(env.master_addr, env.master_port, is_master=False, wait_for_workers=False,
                               timeout=datetime.timedelta(seconds=30))
        self.store = dist.PrefixStore(f"mnist-dist/attempt-{env.restart}/watchdog", client)
        now = time.monotonic()
        # rank -> [beat, progress, step, host, pid, when its beat last changed, when its progress last changed]
        self.ranks: dict[int, list] = {}
        self.heard_at = now                  # the reporter's last complete round
        self.moved_at = now                  # when any rank's progress (or this one's) last moved
        self.total, self.local = -1, -1
        self.failing_since: float | None = None
        self.failure: str | None = None      # "code rank reason", posted by a rank that failed
        self.done = threading.Event()
        for target in (self.report, self.judge):
            threading.Thread(target=target, daemon=True, name=f"watchdog-{target.__name__}").start()

    def stop(self) -> None:
        self.done.set()

    def failed_elsewhere(self) -> PeerFailure | None:
        """Another rank's failure, if one was posted (asks the store, waiting at most 2 s for it)."""
        posted = within(2, lambda: self.store.check(["abort"]) and self.store.get("abort").decode()) or self.failure
        return PeerFailure.posted(self.rank, posted) if posted and int(posted.split()[1]) != self.rank else None

    def abort(self, reason: str, code: int) -> None:
        """Tell the other ranks that this one failed, so they stop now (waits at most 2 s for the store)."""
        within(2, lambda: self.store.set("abort", f"{code} {self.rank} {reason}"))

    # --- the reporter: each interval, one round of talk with the store ------------------------------
    def report(self) -> None:
        keys = [f"rank{r}" for r in range(self.world_size)]
        beat = 0
        while not self.done.is_set():
            beat += 1
            try:
                self.store.set(keys[self.rank], f"{beat} {_progress} {_step} {self.host} {os.getpid()}")
                if self.store.check(["abort"]):
                    self.failure = self.store.get("abort").decode()
                if self.store.check(keys):
                    self.heard(self.store.multi_get(keys))
                self.failing_since = None
            except Exception:  # the store refuses us: the process that served it may be gone
                self.failing_since = self.failing_since or time.monotonic()
            self.done.wait(self.interval)

    def heard(self, values: list[bytes]) -> None:
        now = time.monotonic()
        for r, raw in enumerate(values):
            beat, progress, step, host, pid = raw.decode().split()
            old = self.ranks.get(r) or [None, None, 0, "", 0, now, now]
            self.ranks[r] = [beat, int(progress), int(step), host, int(pid),
                             now if beat != old[0] else old[5], now if int(progress) != old[1] else old[6]]
        self.heard_at = now
        total = sum(v[1] for v in self.ranks.values())
        if total != self.total:
            self.total, self.moved_at = total, now

    # --- the judge ------------------------------------------------------------------------------------
    def judge(self) -> None:
        while not self.done.wait(self.interval):
            now = time.monotonic()
            if self.failure and int(self.failure.split()[1]) != self.rank:
                failure = PeerFailure.posted(self.rank, self.failure)
                self.exit(failure.exit_code, str(failure))
            if self.failing_since and now - self.failing_since > STORE_LOST_S:
                self.exit(EXIT_ERROR, f"rank {self.rank} lost the job's rendezvous store at {self.store_at}: the "
                                      f"process that served it (rank 0, or torchrun's agent) has gone")
            if _progress != self.local:  # this rank moves, even if the store cannot tell us so now
                self.local, self.moved_at = _progress, now
            # a rank past step 1 means every rank took part in step 1 (its gradients were averaged)
            started = _step > 0 or any(v[2] > 0 for v in self.ranks.values())
            if self.timeout and started and len(self.ranks) == self.world_size and now - self.moved_at >= self.timeout:
                self.hung(now)

    def hung(self, now: float) -> None:
        idle, stale_after = now - self.moved_at, max(3 * self.interval, self.timeout / 2)
        step = max(v[2] for v in self.ranks.values())
        if now - self.heard_at > stale_after:
            culprits, who = [0], (f"the rendezvous store at {self.store_at}, which stopped answering (it is served by "
                                  f"rank 0's process, or by torchrun's agent)")
        else:
            culprits = [r for r, v in sorted(self.ranks.items()) if now - v[5] > stale_after]
            if culprits:
                why = "whose process stopped running (stopped, hung in the kernel, or its node is gone)"
            else:  # every process runs: the others wait for the ones that moved last
                last = max(v[6] for v in self.ranks.values())
                culprits = [r for r, v in sorted(self.ranks.items()) if v[6] >= last - 2 * self.interval]
                why = ("which still run" if len(culprits) < self.world_size else "(every rank) which still run") + \
                      " but make no progress (stuck in a collective, a GPU call or the file system)"
            who = ", ".join(f"rank {r} (pid {self.ranks[r][4]} on {self.ranks[r][3]})" for r in culprits) + f", {why}"
            for r in culprits:
                if self.ranks[r][3] == self.host and self.ranks[r][4] != os.getpid() and now - self.ranks[r][5] > stale_after:
                    try:
                        os.kill(self.ranks[r][4], signal.SIGKILL)
                    except OSError:
                        pass
        printer = min((r for r in range(self.world_size) if r not in culprits), default=0)
        self.exit(EXIT_HUNG, (f"no progress on any rank for {idle:.0f} s (--hang-timeout {self.timeout:g}) at step "
                              f"{step}: waiting for {who}; look at that process or node (py-spy dump --pid PID, the "
                              f"node's dmesg), then run the same command again to resume from the newest checkpoint")
                  if printer == self.rank else None)

    def exit(self, code: int, message: str | None) -> None:
        """End this process now: the main thread may be blocked in a collective that never returns."""
        if message:
            print(f"mnist-dist: error: {message}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(code)


def within(seconds: float, fn):
    """fn() in a thread of its own, waiting at most `seconds` for it (the store may not answer, or be
    gone): its result, or None."""
    result = []

    def run() -> None:
        try:
            result.append(fn())
        except Exception:
            pass
    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    return result[0] if result else None
