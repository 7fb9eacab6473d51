"""Distributed set-up: read the launcher's environment once, start and stop the process group, and the
cross-rank calls every rank makes together (`Ranks`).

Every launcher ends here: torchrun and submitit set RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/
MASTER_PORT; a plain `srun python -m mnist_dist.train` sets only Slurm's variables, from which the
same values are derived; a plain `python -m mnist_dist.train` is world size 1 on 127.0.0.1.
"""
from __future__ import annotations

import contextlib
import datetime
import fcntl
import gc
import io
import json
import os
import re
import socket
import struct
import time
from dataclasses import dataclass
from typing import Any
from collections.abc import Callable, Mapping

import torch
import torch.distributed as dist

from . import postmortem, progress
from .devices import check_own_gpus
from .errors import StartFailed, UsageError, first_line


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

    @property
    def store_prefix(self) -> str:
        """Each torchrun round gets its own key space in the store: after a worker died, the restarted
        group must not read the dead group's keys (gloo would try its addresses). A node that joins
        starts a round without counting a restart, but it always adds ranks: within one restart count
        the world size only grows, so the two together name the round."""
        return f"mnist-dist/attempt-{self.restart}-world-{self.world_size}"


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


def collective_timeout(start_timeout_s: float, hang_timeout_s: float) -> datetime.timedelta:
    """The store's and the collectives' own timeout (NCCL's watchdog aborts at it; download, data load and
    W&B start-up are bounded by it): the start-up limit, or longer than --hang-timeout, so that the hang
    watchdog, which names the stuck rank, always speaks first."""
    return datetime.timedelta(seconds=max(start_timeout_s, hang_timeout_s + 60))


def connect(env: DistEnv, timeout: datetime.timedelta, start_timeout_s: float) -> dist.Store:
    """The job's rendezvous store (served by rank 0, or by torchrun's agent). Rank 0 does not wait here
    for the others: the watchdog, which starts next, bounds that wait (--start-timeout)."""
    serves = env.rank == 0 and not env.agent_store
    if not serves:
        await_store(env, start_timeout_s)
    return dist.TCPStore(env.master_addr, env.master_port, env.world_size, timeout=timeout,
                         is_master=serves, wait_for_workers=False)


def await_store(env: DistEnv, within_s: float) -> None:
    """Until the store's port takes a connection: a rank started before rank 0 waits for it; one whose
    store never comes ends in one line at --start-timeout (TCPStore's own client would retry for twice
    its timeout, printing C++ stack traces)."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            socket.create_connection((env.master_addr, env.master_port), timeout=2).close()
            return
        except OSError as err:
            if time.monotonic() > deadline:
                raise StartFailed(
                    f"rank {env.rank} on {socket.gethostname()} could not reach the job's rendezvous store at "
                    f"{env.master_addr}:{env.master_port} within {within_s:.0f} s (--start-timeout): "
                    f"{err.strerror or err}; its server (rank 0, or torchrun's agent) never came up there: check "
                    "MASTER_ADDR/MASTER_PORT and that rank 0 started") from None
            time.sleep(0.5)


def init(env: DistEnv, store: dist.Store, device: torch.device, timeout: datetime.timedelta) -> None:
    """Join the process group: nccl for GPUs, gloo for CPU. World size 1 takes the same path. Across
    hosts the sockets use the interface that reaches the other hosts (`choose_interface`). A failure
    here is a StartFailed, one line; the watchdog tells the other ranks."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    postmortem.record_collectives(backend)
    store = dist.PrefixStore(env.store_prefix, store)  # this restart round's key space
    choose_interface(store, env)
    if device.type == "cuda":
        check_own_gpus(store, env.rank, env.world_size, device)
    try:
        dist.init_process_group(backend, store=store, rank=env.rank, world_size=env.world_size,
                                timeout=timeout, device_id=device if device.type == "cuda" else None)
    except (RuntimeError, OSError) as err:  # gloo's and NCCL's connection errors (DistError is a RuntimeError)
        raise StartFailed(start_failure(err, env)) from None


SOCKET_IFNAMES = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")


def choose_interface(store: dist.Store, env: DistEnv, environ: dict = os.environ) -> str | None:
    """Across hosts, point gloo's and NCCL's sockets at the interface that routes to the other hosts,
    where the user has not chosen one. Left alone, both take the address the host's own name resolves
    to, which on Debian and Ubuntu is 127.0.1.1 (/etc/hosts): the other hosts cannot reach it. Every rank
    posts its host and addresses in the store; returns the interface chosen here, if any."""
    if env.world_size == 1 or all(name in environ for name in SOCKET_IFNAMES):
        return None
    mine, here = interface_addresses(), host_identity()
    store.set(f"host/{env.rank}", f"{here} " + ",".join(mine.values()))
    others = store.multi_get([f"host/{r}" for r in range(env.world_size)])
    remote = [addrs for ident, _, addrs in (raw.decode().partition(" ") for raw in others) if ident != here]
    if not remote:
        return None  # every rank on this host: loopback is right
    for addr in [a for addrs in remote for a in addrs.split(",") if a]:
        local = route_source(addr)
        name = next((n for n, a in mine.items() if a == local), None)
        if name:
            for var in SOCKET_IFNAMES:
                environ.setdefault(var, name)
            return name
    return None


def interface_addresses() -> dict[str, str]:
    """This host's interfaces that have an IPv4 address and are not loopback: name -> address."""
    found = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            with contextlib.suppress(OSError):  # no IPv4 address on it
                raw = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))  # SIOCGIFADDR
                addr = socket.inet_ntoa(raw[20:24])
                if not addr.startswith("127."):
                    found[name] = addr
    return found


def route_source(addr: str) -> str | None:
    """The local address this host would send from to reach `addr` (a route lookup; nothing is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((addr, 9))
        except OSError:
            return None
        return s.getsockname()[0]


def host_identity() -> str:
    """Which machine (and PID namespace) this process runs on: the kernel's boot id and the PID
    namespace. Unlike the hostname, two hosts never share it, so a pid is only taken to be one of ours
    when the identities match."""
    with open("/proc/sys/kernel/random/boot_id") as f:
        boot = f.read().strip()
    return f"{boot}/{os.stat('/proc/self/ns/pid').st_ino}"


def start_failure(err: Exception, env: DistEnv) -> str:
    """One line for a process group that could not form, with the fix where the cause is known."""
    text = " ".join(str(err).split())
    where = f"rank {env.rank} on {socket.gethostname()} could not join the process group"
    loopback = re.search(r"\b(127\.\d+\.\d+\.\d+)\b", text)
    if loopback and env.world_size > 1:
        chosen = " ".join(f"{v}={os.environ[v]}" for v in SOCKET_IFNAMES if v in os.environ) or "neither set"
        return (f"{where}: it was offered the loopback address {loopback.group(1)}, which no other host can reach (a "
                f"host name that resolves to it in /etc/hosts, or an interface set to lo); set GLOO_SOCKET_IFNAME and "
                f"NCCL_SOCKET_IFNAME on every node to the interface that reaches the other hosts (here: {chosen})")
    return f"{where}: {first_line(err)}"


def shutdown(clean: bool) -> None:
    """Leave the process group. DDP's reducer sits in reference cycles that hold gloo work objects;
    freed only at interpreter exit they can abort the process (SIGABRT), so collect them first. After
    a clean run every rank waits for the others, so no rank tears down a connection still in use."""
    if dist.is_initialized():
        if dist.get_world_size() > 1:  # only then was there a DDP reducer
            gc.collect()
        if clean:
            progress.entering("the barrier at the end of the run")
            dist.barrier()
        dist.destroy_process_group()


Where = str  # "all" ranks, "main" (rank 0) or "local_main" (each node's first rank)


class Ranks:
    """The cross-rank calls of one job, bound once to its environment and device. Every rank calls
    every method (each holds a collective), also where `fn` runs on some ranks only. Host-device sync
    points, all of them."""

    def __init__(self, env: DistEnv, device: torch.device):
        self.env, self.device = env, device

    def check(self, fn: Callable[..., Any], *args: Any, on: Where = "all", **kwargs: Any) -> Any:
        """fn(*args, **kwargs) on the ranks `on` names. If it raises a UsageError on any rank, every rank raises
        one with the first failing rank's message (nobody hangs; rank 0 can say why). Returns fn's
        result where it ran, None elsewhere."""
        runs_here = {"all": True, "main": self.env.is_main, "local_main": self.env.is_local_main}[on]
        result, error = None, None
        if runs_here:
            try:
                result = fn(*args, **kwargs)
            except UsageError as err:
                error = err
        what = f"the verdict of {getattr(fn, '__name__', 'a check')}"
        failed = self._reduce([float(self.env.rank if error else self.env.world_size)], dist.ReduceOp.MIN, what)[0]
        if failed < self.env.world_size:
            message = self.broadcast(str(error) if error else None, src=int(failed), what=f"{what}'s message")
            raise UsageError(message, everywhere=True) from None
        return result

    def from_main(self, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args) on rank 0 (a check, as above), and its result on every rank."""
        what = f"rank 0's {getattr(fn, '__name__', 'result')}"
        return self.broadcast(self.check(fn, *args, on="main"), src=0, what=what)

    def from_newest(self, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args) on each node's first rank (a check, as above) returns a checkpoint or None; the one with
        the most steps (the lowest rank's among equals) is sent to every rank. Node-local run dirs differ
        once a node was lost and rank 0 moved: the newest checkpoint any node holds is the resume point."""
        found = self.check(fn, *args, on="local_main")
        W = self.env.world_size
        score = (found["step"] + 1) * W + (W - 1 - self.env.rank) if found is not None else -1
        best = int(
            self._reduce([float(score)], dist.ReduceOp.MAX, f"the newest {getattr(fn, '__name__', 'result')}")[0]
        )
        if best < 0:
            return None
        src = W - 1 - best % W
        return self.broadcast(found if self.env.rank == src else None, src=src, what="the newest checkpoint")

    def max(self, values: list[float], what: str = "a maximum over the ranks") -> list[float]:
        return self._reduce(values, dist.ReduceOp.MAX, what)

    def sum(self, values: list[float], what: str = "a sum over the ranks") -> list[float]:
        """A few numbers summed over all ranks; `what` they are names the collective in post-mortems."""
        return self._reduce(values, dist.ReduceOp.SUM, what)

    def main_values(self, values: list[float], what: str = "rank 0's numbers") -> list[float]:
        """Rank 0's numbers on every rank."""
        progress.entering(f"broadcast of {what}")
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.broadcast(t, src=0)
        return t.tolist()

    def broadcast(self, obj: Any, src: int, what: str = "an object") -> Any:
        """Rank `src`'s tensors and plain data (a checkpoint, a config, a message) on every rank.
        Serialised with torch.save and read back with weights_only=True: nothing that arrives can run code."""
        progress.entering(f"broadcast of {what} from rank {src}")
        payload = b""
        if self.env.rank == src:
            buf = io.BytesIO()
            torch.save(obj, buf)
            payload = buf.getvalue()
        size = torch.tensor([len(payload)], dtype=torch.int64, device=self.device)
        dist.broadcast(size, src=src)
        data = (torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(self.device) if self.env.rank == src
                else torch.empty(int(size.item()), dtype=torch.uint8, device=self.device))
        dist.broadcast(data, src=src)
        return torch.load(io.BytesIO(data.cpu().numpy().tobytes()), weights_only=True)

    def _reduce(self, values: list[float], op: dist.ReduceOp, what: str) -> list[float]:
        progress.entering(f"all_reduce of {what}")
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=op)
        return t.tolist()


def all_gather_json(obj: Any, world_size: int, group=None, device: torch.device | None = None) -> list:
    """Every rank's JSON-able `obj`, in rank order (bytes in tensors on `device`, the CPU by default: nothing
    is unpickled)."""
    raw = torch.tensor(list(json.dumps(obj).encode()), dtype=torch.uint8, device=device)
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world_size)]
    dist.all_gather(sizes, torch.tensor([len(raw)], device=device), group=group)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, dtype=torch.uint8, device=device)
    padded[:len(raw)] = raw
    rows = [torch.zeros(longest, dtype=torch.uint8, device=device) for _ in range(world_size)]
    dist.all_gather(rows, padded, group=group)
    return [json.loads(bytes(r[:int(s.item())].tolist())) for r, s in zip(rows, sizes, strict=True)]
