"""The hang watchdog: a job whose ranks stop making progress ends within seconds, naming the culprits;
a rank that fails stops the others at once.

    mnist-dist train --hang-timeout 300     # the default; 0 turns the hang check off

Progress is the per-rank counter in progress.py. Every rank runs two daemon threads beside training:
- the publisher sends, each interval, this rank's heartbeat (a counter: the process is running), its
  progress and its step to the job's rendezvous store, and reads every rank's;
- the judge decides from what the publisher last heard, and never waits on the network itself:
  * once training has started (the first step), if no rank's progress moved for `hang_timeout` seconds,
    the job is hung. It names the ranks whose heartbeat stopped (a stopped or wedged process, a lost
    node); if every process still runs, the ranks that moved last (the others wait for them in a
    collective). Every live rank writes its post-mortem (postmortem.py) into one folder of the run dir
    and exits with EXIT_HUNG; a stopped rank on this host is killed, so that torchrun restarts the
    group at once instead of waiting for it to exit.
  * if a rank posted a failure (`abort`), every other rank exits at once with its exit code, instead of
    waiting in a collective for a peer that is gone (NCCL waits out its own timeout).
Before the first step (download, rendezvous, W&B start-up) the process group's start-up limit applies.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from pathlib import Path
import signal
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any
from collections.abc import Callable

import torch.distributed as dist

from . import postmortem, progress
from .container import INIT_FIXES
from .distributed import DistEnv, host_identity
from .errors import EXIT_ERROR, EXIT_HUNG, PeerStopped, exit_process, print_error

STORE_LOST_S = 10.0  # the store refusing us this long: the process that served it has gone
REPORTS_WAIT_S = 5.0  # how long the first rank to exit at a hang waits for the others' post-mortems


@dataclass(frozen=True)
class Heartbeat:
    """What a rank publishes each interval."""

    count: int     # goes up while the process runs
    progress: int  # progress.units
    step: int
    host: str      # the hostname, for people
    pid: int
    ident: str     # distributed.host_identity(): which machine and PID namespace the pid belongs to
    started: int   # the process's start time (clock ticks after boot): the pid is still this process

    def encode(self) -> str:
        return f"{self.count} {self.progress} {self.step} {self.host} {self.pid} {self.ident} {self.started}"

    @classmethod
    def decode(cls, raw: bytes) -> Heartbeat:
        count, units, step, host, pid, ident, started = raw.decode().split()
        return cls(int(count), int(units), int(step), host, int(pid), ident, int(started))


@dataclass
class Peer:
    """What this rank last heard of another (or of itself, through the store)."""

    last: Heartbeat
    alive_at: float  # when its heartbeat count last changed (time.monotonic())
    moved_at: float  # when its progress last changed


@dataclass(frozen=True)
class Failure:
    """A rank's failure, posted in the store for the others as "code rank reason"."""

    code: int
    rank: int
    reason: str

    def encode(self) -> str:
        return f"{self.code} {self.rank} {self.reason}"

    @classmethod
    def decode(cls, text: str) -> Failure:
        code, rank, reason = text.split(" ", 2)
        return cls(int(code), int(rank), reason)

    def stops(self, rank: int) -> PeerStopped:
        """The error with which `rank` stops because of this failure."""
        return PeerStopped(f"rank {rank} stops: rank {self.rank} failed ({self.reason})", self.code)


class Watchdog:
    def __init__(self, env: DistEnv, hang_timeout: float, run_dir: str | os.PathLike = ".", start_timeout: float = 600):
        self.rank, self.world_size, self.timeout = env.rank, env.world_size, hang_timeout
        self.agent_store = env.agent_store  # torchrun's agent serves the store (c10d rendezvous)
        self.run_dir = Path(run_dir)
        self.interval = min(1.0, hang_timeout / 10) if hang_timeout else 1.0
        self.store_at = f"{env.master_addr}:{env.master_port}"
        self.host, self.ident, self.started = socket.gethostname(), host_identity(), process_start(os.getpid())
        # a connection of its own: a blocked read here never holds up the process group's
        client = dist.TCPStore(env.master_addr, env.master_port, is_master=False, wait_for_workers=False,
                               timeout=datetime.timedelta(seconds=30))
        self.store = dist.PrefixStore(f"{env.store_prefix}/watchdog", client)
        now = time.monotonic()
        self.peers: dict[int, Peer] = {}
        self.heard_at = now                  # the publisher's last complete round
        self.moved_at = now                  # when any rank's progress (or this one's) last moved
        self.total, self.local = -1, -1
        self.failing_since: float | None = None
        self.failure: Failure | None = None  # posted by a rank that failed
        self.hang_declared = False           # by another rank: follow it at once
        self.forming_since: float | None = now  # until the process group has formed (`formed`)
        self.startup_limit = start_timeout
        self.seen: set[int] = set()          # the ranks whose heartbeat has arrived at least once
        self.done = threading.Event()
        for target in (self.publish, self.judge):
            threading.Thread(target=target, daemon=True, name=f"watchdog-{target.__name__}").start()

    def stop(self) -> None:
        self.done.set()

    def formed(self) -> None:
        """The process group has formed: from now on the start-up limit is the collectives' business."""
        self.forming_since = None

    def failed_elsewhere(self) -> PeerStopped | None:
        """Another rank's failure, if one was posted (asks the store, waiting at most 2 s for it)."""
        posted = call_with_timeout(2, lambda: self.store.check(["abort"]) and self.store.get("abort").decode())
        failure = Failure.decode(posted) if posted else self.failure
        return failure.stops(self.rank) if failure and failure.rank != self.rank else None

    def abort(self, failure: Failure) -> None:
        """Tell the other ranks that this one failed, so they stop now (waits at most 2 s for the store)."""
        call_with_timeout(2, lambda: self.store.set("abort", failure.encode()))

    # --- the publisher: each interval, one round of talk with the store ------------------------------
    def publish(self) -> None:
        keys = [f"rank{r}" for r in range(self.world_size)]
        count = 0
        while not self.done.is_set():
            count += 1
            try:
                self.store.set(keys[self.rank], Heartbeat(count, progress.units, progress.step, self.host,
                                                          os.getpid(), self.ident, self.started).encode())
                if len(self.seen) < self.world_size:
                    self.seen.update(r for r in range(self.world_size) if r in self.seen or self.store.check([keys[r]]))
                self.hang_declared = self.hang_declared or self.store.check(["hang"])
                if self.store.check(["abort"]):
                    self.failure = Failure.decode(self.store.get("abort").decode())
                if self.store.check(keys):
                    self.heard([Heartbeat.decode(raw) for raw in self.store.multi_get(keys)])
                self.failing_since = None
            except Exception:  # the store refuses us: the process that served it may be gone
                self.failing_since = self.failing_since or time.monotonic()
            self.done.wait(self.interval)

    def heard(self, beats: list[Heartbeat]) -> None:
        now = time.monotonic()
        for r, beat in enumerate(beats):
            old = self.peers.get(r)
            self.peers[r] = Peer(beat, now if not old or beat.count != old.last.count else old.alive_at,
                                 now if not old or beat.progress != old.last.progress else old.moved_at)
        self.heard_at = now
        total = sum(p.last.progress for p in self.peers.values())
        if total != self.total:
            self.total, self.moved_at = total, now

    # --- the judge ------------------------------------------------------------------------------------
    def judge(self) -> None:
        while not self.done.wait(self.interval):
            now = time.monotonic()
            if self.failure and self.failure.rank != self.rank:
                stopped = self.failure.stops(self.rank)
                self.exit(stopped.exit_code, str(stopped))
            if self.failing_since and now - self.failing_since > STORE_LOST_S:
                self.exit(EXIT_ERROR, f"rank {self.rank} lost the job's rendezvous store at {self.store_at}: the "
                                      f"process that served it (rank 0, or torchrun's agent) has gone")
            if self.forming_since is not None and now - self.forming_since > self.startup_limit:
                missing = sorted(set(range(self.world_size)) - self.seen)
                self.exit(
                    EXIT_ERROR,
                    f"rank {self.rank}: the process group did not form within "
                    f"{self.startup_limit:.0f} s: "
                    + (
                        f"rank(s) {missing} never reached the store at {self.store_at}"
                        if missing
                        else "every rank reached the store, but they could "
                        "not connect to each other (blocked ports? GLOO_SOCKET_IFNAME/NCCL_SOCKET_IFNAME)"
                    ),
                )
            if progress.units != self.local:  # this rank moves, even if the store cannot tell us so now
                self.local, self.moved_at = progress.units, now
            # a rank past step 1 means every rank took part in step 1 (its gradients were averaged)
            started = progress.step > 0 or any(p.last.step > 0 for p in self.peers.values())
            if self.timeout and started and len(self.peers) == self.world_size and (
                    now - self.moved_at >= self.timeout or self.hang_declared):
                self.hung(now)

    def hung(self, now: float) -> None:
        stale_after = max(3 * self.interval, self.timeout / 2)
        step = progress.step  # the ranks move in lockstep: every rank waits after the same step
        store_lost = now - self.heard_at > stale_after
        stopped = [r for r, p in sorted(self.peers.items()) if now - p.alive_at > stale_after]  # heartbeat stale
        culprits, stopped_here = [0], {}
        if store_lost:
            who = (f"the rendezvous store at {self.store_at}, which stopped answering (the network to it is cut, or "
                   f"the process that serves it, rank 0's or torchrun's agent, is stopped or gone)")
        else:
            culprits, why = self.culprits(stopped)
            who = ", ".join(f"rank {r} (pid {self.peers[r].last.pid} on {self.peers[r].last.host})" for r in culprits)
            who += f", {why}"
            stopped_here = self.stopped_here(stopped)
        folder = self.postmortem_folder(step)
        line = (f"no progress on any rank for {now - self.moved_at:.0f} s (--hang-timeout {self.timeout:g}) at step "
                f"{step}: waiting for {who}; what each rank was doing is in {folder} (mnist-dist hangs "
                f"{self.run_dir}); then run the same command again to resume from the newest checkpoint")
        try:
            postmortem.write(folder, self.rank, self.world_size, culprits, line, stopped_here)
        except Exception as err:  # whatever happens, this thread must end the process
            line += f" (rank {self.rank} could not write its post-mortem: {type(err).__name__}: {err})"
        self.wait_for_reports(1 if store_lost else self.world_size - len(stopped))
        for pid in stopped_here.values():
            with contextlib.suppress(OSError):  # it ended by itself meanwhile, or is not ours to signal
                os.kill(pid, signal.SIGKILL)
        printer = min((r for r in range(self.world_size) if r not in culprits), default=0)
        if store_lost and self.agent_store:
            line += "; " + stop_cut_off_agent()
        self.exit(EXIT_HUNG, line if printer == self.rank or store_lost else None)

    def wait_for_reports(self, live: int) -> None:
        """Count this rank's post-mortem as written and wait (a few seconds at most) for the other live
        ranks': a launcher kills them as soon as one rank exits."""
        written = call_with_timeout(2, lambda: self.store.add("hang-reports", 1))
        end = time.monotonic() + REPORTS_WAIT_S
        while written is not None and written < live and time.monotonic() < end:
            time.sleep(0.05)
            written = call_with_timeout(1, lambda: self.store.add("hang-reports", 0))

    def postmortem_folder(self, step: int) -> Path:
        """RUN_DIR/hangs/<when>-step<N>: the first rank to get here names it for all (through the store)."""
        mine = f"{time.strftime('%Y%m%d-%H%M%S')}-step{step}"
        agreed = call_with_timeout(2, lambda: self.store.compare_set("hang", "", mine).decode())
        return self.run_dir / "hangs" / (agreed or mine)

    def culprits(self, stopped: list[int]) -> tuple[list[int], str]:
        """The ranks the others wait for, and why, in words; `stopped`: those whose heartbeat is stale."""
        if stopped:
            return (
                stopped,
                "whose process stopped running (stopped, hung in the kernel, its node gone or its network cut)",
            )
        last = max(p.moved_at for p in self.peers.values())  # every process runs: the others wait for these
        moved_last = [r for r, p in sorted(self.peers.items()) if p.moved_at >= last - 2 * self.interval]
        which = "which still run" if len(moved_last) < self.world_size else "(every rank) which still run"
        return moved_last, f"{which} but make no progress (stuck in a collective, a GPU call or the file system)"

    def stopped_here(self, stopped: list[int]) -> dict[int, int]:
        """The stopped ranks proven to run on this host (rank -> pid): the same host identity (not just the
        same hostname), and the pid still the process that published it. Their state goes into the
        post-mortem, then they are killed, so that torchrun notices at once and restarts the group."""
        return {r: beat.pid for r in stopped for beat in [self.peers[r].last]
                if beat.ident == self.ident and beat.pid != os.getpid() and process_start(beat.pid) == beat.started}

    def exit(self, code: int, message: str | None) -> None:
        """End this process now: the main thread may be blocked in a collective that never returns."""
        if message:
            print_error(message)
        exit_process(code)


def stop_cut_off_agent() -> str:
    """End this node's torchrun agent if it is cut off from its c10d rendezvous store too. It would wait
    for the store in a blocking read that neither its timeouts nor SIGTERM end: until TCP gives up on
    the connection (net.ipv4.tcp_retries2, about 15 minutes by default), holding the node until the
    job's time limit. An agent that still reaches its rendezvous (on another host) is left to carry on:
    it restarts or shrinks the group. Returns what happened, for the hang line."""
    agent = os.getppid()
    try:
        with open(f"/proc/{agent}/cmdline", "rb") as f:
            args = f.read().decode(errors="replace").split("\0")
    except OSError:
        return "torchrun's agent on this node has gone"
    if not any(a.endswith(("torch.distributed.run", "torchrun")) for a in args):
        return "the process that started this rank is not torchrun's agent: left alone"
    endpoint = option(args, "rdzv-endpoint")
    if option(args, "rdzv-backend") != "c10d" or not endpoint:
        return "torchrun's agent (static rendezvous) ends by itself"
    host, _, port = endpoint.rpartition(":") if ":" in endpoint else (endpoint, "", "29400")
    try:
        socket.create_connection((host, int(port)), timeout=3).close()
        return f"torchrun's agent still reaches its rendezvous at {endpoint}: left to restart the group"
    except (OSError, ValueError):
        pass
    if agent == 1:  # the kernel drops kill -9 to its PID namespace's first process from inside
        return (f"torchrun's agent is PID 1 of this container, which nothing inside it can end: its command waits "
                f"for TCP to give up (about 15 minutes); start it under an init: {INIT_FIXES}")
    with contextlib.suppress(OSError):
        os.kill(agent, signal.SIGKILL)
    return (f"torchrun's agent on this node (pid {agent}), cut off from its rendezvous at {endpoint}, is ended "
            f"with kill -9 (it would wait about 15 minutes for TCP to give up), so its command exits 137")


def option(args: list[str], name: str) -> str | None:
    """The value of torchrun's --name (also --name=value and the underscore spelling) in its arguments."""
    spellings = (f"--{name}", f"--{name.replace('-', '_')}")
    for i, arg in enumerate(args):
        key, eq, value = arg.partition("=")
        if key in spellings:
            return value if eq else (args[i + 1] if i + 1 < len(args) else None)
    return None


def process_start(pid: int) -> int:
    """When process `pid` started (clock ticks after boot; /proc/PID/stat field 22), or -1 if there is none."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rpartition(")")[2].split()[19])
    except (OSError, ValueError, IndexError):
        return -1


def call_with_timeout(seconds: float, fn: Callable[[], Any]) -> Any:
    """fn() (a store call) in a thread of its own, waiting at most `seconds`: its result, or None (also
    when it raised). The store may not answer: a node cut off, the process serving it gone."""
    result: list[Any] = []

    def run() -> None:
        try:
            result.append(fn())
        except Exception:  # a store that is gone: the same as no answer
            result.append(None)
    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    return result[0] if result else None
