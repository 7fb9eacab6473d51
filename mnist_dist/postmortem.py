"""Post-mortems of a hang: what every rank that still runs was doing, written by its watchdog before it
exits, and a summary of them.

    RUN_DIR/hangs/<when>-step<N>/rank-<r>.txt   step, phase, last collective, the Python stacks of all
                                                threads, and /proc's view of stopped ranks on this host
    RUN_DIR/hangs/<when>-step<N>/rank-<r>.flight-recorder.json   the collectives' Flight Recorder, where
                                                it records (TORCH_FR_BUFFER_SIZE; on by default with NCCL)
    mnist-dist hangs RUN_DIR                    one line per rank of the newest post-mortem

A rank that cannot run Python any more (stopped, wedged in the kernel, its node gone) writes nothing:
the summary names it as missing, with its process state where a rank on its host saw it.
"""
from __future__ import annotations

import argparse
import faulthandler
import os
import re
import socket
import threading
import time
from pathlib import Path
from collections.abc import MutableMapping

from . import progress
from .errors import UsageError

FRAME = re.compile(r'File "(?:[^"]*/)?(mnist_dist/\w+\.py)", line (\d+) in (\w+)')
SEEN = re.compile(r"^rank (\d+) \(pid (\d+)\) seen from /proc on (\S+): state (.+)$", re.M)


def write(folder: Path, rank: int, world_size: int, waiting_for: list[int], hang: str,
          stopped_here: dict[int, int]) -> Path:
    """This rank's post-mortem in `folder`; `stopped_here`: rank -> pid of stopped ranks on this host."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"rank-{rank}.txt"
    since = time.monotonic() - progress.collective_at if progress.collective else 0.0
    with open(path, "w") as fh:
        fh.write(f"rank: {rank} of {world_size}\npid: {os.getpid()}\nhost: {socket.gethostname()}\n"
                 f"step: {progress.step}\nphase: {progress.phase}\n"
                 f"last collective: {progress.collective or 'none yet'} (entered {since:.1f} s before)\n"
                 f"waiting for: {', '.join(f'rank {r}' for r in waiting_for)}\nhang: {hang}\n\n"
                 f"Python stacks of every thread (the main thread is {threading.main_thread().ident:#018x}):\n")
        fh.flush()
        faulthandler.dump_traceback(fh, all_threads=True)
        for r, pid in stopped_here.items():
            fh.write(f"\n{proc_view(r, pid)}\n")
    flight = flight_recorder()
    if flight:
        (folder / f"rank-{rank}.flight-recorder.json").write_bytes(flight)
    return path


def proc_view(rank: int, pid: int) -> str:
    """What the kernel says of a process that does not run: its state, where it waits, its kernel stack."""
    def read(name: str) -> str:
        try:
            return (Path("/proc") / str(pid) / name).read_text().strip()
        except OSError as err:  # gone, or not ours to read
            return f"(unreadable: {err.strerror})"
    state = next((line.split(":", 1)[1].strip() for line in read("status").splitlines() if line.startswith("State:")),
                 "unknown")
    return (f"rank {rank} (pid {pid}) seen from /proc on {socket.gethostname()}: state {state}\n"
            f"wchan: {read('wchan') or '-'}\nkernel stack:\n{read('stack')}")


def record_collectives(backend: str, environ: MutableMapping[str, str] = os.environ) -> None:
    """Turn the Flight Recorder on for NCCL (as torchtitan does), unless the user set it: it keeps the
    last collectives of each process group for a hang's post-mortem. Read when the process group starts."""
    if backend == "nccl":
        environ.setdefault("TORCH_FR_BUFFER_SIZE", "2000")


def flight_recorder() -> bytes | None:
    """The Flight Recorder's record of this rank's collectives as JSON, if it keeps one (NCCL keeps its
    own; gloo records where TORCH_FR_BUFFER_SIZE is set)."""
    import torch.distributed as dist
    from torch._C import _distributed_c10d as c10d

    if int(os.environ.get("TORCH_FR_BUFFER_SIZE", "0") or 0) <= 0 or not dist.is_initialized():
        return None
    dump = c10d._dump_nccl_trace_json if dist.get_backend() == "nccl" else c10d._dump_fr_trace_json
    try:
        return dump()
    except RuntimeError:  # no process group recorded anything
        return None


# --- the summary ------------------------------------------------------------------------------------

def read_report(path: Path) -> dict:
    """A post-mortem file: its header fields, the innermost frame of our code in the main thread, and the
    stopped ranks it saw."""
    text = path.read_text()
    head, _, rest = text.partition("\n\n")
    fields = dict(line.split(": ", 1) for line in head.splitlines() if ": " in line)
    main = re.search(r"main thread is (0x[0-9a-f]+)", rest)
    frame = "no frame of mnist_dist"
    if main:
        block = re.search(rf"^(?:Current thread|Thread) {main.group(1)} \(most recent call first\):\n((?:  .*\n?)*)",
                          rest, re.M | re.I)
        found = FRAME.search(block.group(1)) if block else None
        if found:
            frame = f"{found.group(3)} ({found.group(1)}:{found.group(2)})"
    return {**fields, "frame": frame, "seen": {int(m.group(1)): m.group(4) for m in SEEN.finditer(rest)}}


def newest(run_dir: str | os.PathLike) -> Path:
    hangs = Path(run_dir) / "hangs"
    found = sorted(p for p in hangs.glob("*") if p.is_dir()) if hangs.is_dir() else []
    if not found:
        raise UsageError(f"no post-mortem in {hangs}: no hang was recorded in this run dir")
    return found[-1]


def summary(run_dir: str | os.PathLike) -> str:
    folder = newest(run_dir)
    reports = {int(p.stem.split("-")[1]): read_report(p) for p in folder.glob("rank-*.txt")}
    if not reports:
        raise UsageError(f"{folder} holds no rank's report")
    any_report = next(iter(reports.values()))
    world_size = int(any_report["rank"].split(" of ")[1])
    seen = {r: state for report in reports.values() for r, state in report["seen"].items()}
    lines = [f"post-mortem {folder}: step {any_report['step']}, the ranks waited for {any_report['waiting for']}"]
    for r in range(world_size):
        if r in reports:
            rep = reports[r]
            lines.append(f"rank {r}: {rep['phase']}; last collective {rep['last collective']}; in {rep['frame']}")
        else:
            state = f"state {seen[r]}" if r in seen else "no rank on its host saw its state"
            lines.append(f"rank {r}: missing (it could not run Python: {state})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mnist-dist hangs", description="Summarise the newest hang post-mortem of a run.")
    p.add_argument("run_dir")
    print(summary(p.parse_args(argv).run_dir))
    return 0
