"""What the suite leaves behind: the processes it started, network namespaces, veths, mounts, cgroups and
/etc/hosts lines. conftest.py takes a snapshot when the session starts and fails the run if anything is still there
when it ends (after every fixture's teardown), listing what it found; then it removes it.

Every process a test starts inherits MARK in its environment (torchrun's ranks, Slurm's daemons and the
jobs they start, the hosts' namespace holders), so a process is the suite's by that mark, whatever its
parent or PID namespace."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

MARK = "MNIST_DIST_TEST_SESSION"


def marked_processes(session: str) -> dict[int, str]:
    """pid -> command line of every live process (in any PID namespace) that carries this session's mark."""
    found, me = {}, os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            if f"{MARK}={session}".encode() not in environ:
                continue
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # gone meanwhile, or a kernel thread
            continue
        if stat[stat.rfind(")") + 2] == "Z" or _ends_with_us(entry, cmdline, me):
            continue
        found[int(entry.name)] = cmdline[:200]
    return found


def _ends_with_us(entry: Path, cmdline: str, me: int) -> bool:
    """multiprocessing's resource tracker, a child of pytest itself: it exits when pytest's end of its
    pipe closes, which is after the session ends (in-process tests that map shared memory start it)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        return ppid == me and "multiprocessing.resource_tracker" in cmdline
    return False


def _lines(argv: list[str]) -> set[str]:
    out = subprocess.run(argv, capture_output=True, text=True)
    return set(out.stdout.splitlines()) if out.returncode == 0 else set()


CGROUP_ROOTS = (Path("/sys/fs/cgroup/cpu"), Path("/sys/fs/cgroup"))  # cgroup v1's cpu hierarchy, v2's


def _cgroups() -> set[str]:
    """The cgroups one level below the CPU hierarchies' roots (where tests/helpers.cpu_quota makes its own)."""
    return {str(d) for root in CGROUP_ROOTS if root.is_dir() for d in root.iterdir()
            if d.is_dir() and (d / "cgroup.procs").exists()}


def _mounts() -> set[str]:
    return {" ".join(line.split()[3:5]) for line in Path("/proc/self/mountinfo").read_text().splitlines()}


@dataclass
class Snapshot:
    netns: set[str] = field(default_factory=lambda: _lines(["ip", "netns", "list"]))
    veths: set[str] = field(default_factory=lambda: {line.split(":")[1].split("@")[0].strip()
                                                     for line in _lines(["ip", "-o", "link", "show", "type", "veth"])})
    mounts: set[str] = field(default_factory=_mounts)
    cgroups: set[str] = field(default_factory=_cgroups)
    etc_hosts: set[str] = field(default_factory=lambda: set(Path("/etc/hosts").read_text().splitlines()))


def leftovers(session: str, before: Snapshot) -> list[str]:
    """What is there now that the suite made: one line each."""
    now = Snapshot()
    found = [f"process {pid}: {cmd}" for pid, cmd in sorted(marked_processes(session).items())]
    found += [f"network namespace {name}" for name in sorted(now.netns - before.netns)]
    found += [f"veth {name}" for name in sorted(now.veths - before.veths)]
    found += [f"mount {m}" for m in sorted(now.mounts - before.mounts)]
    found += [f"cgroup {path}" for path in sorted(now.cgroups - before.cgroups)]
    found += [f"/etc/hosts line {line!r}" for line in sorted(now.etc_hosts - before.etc_hosts)]
    return found


def remove(session: str, before: Snapshot) -> None:
    """Remove what leftovers() lists, as far as it can: kill -9 the processes (a namespace, veth or mount
    held only by them goes with them); unmount the mounts; remove the cgroups; drop the /etc/hosts lines."""
    for pid in marked_processes(session):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    now = Snapshot()
    for mount in sorted(now.mounts - before.mounts, key=len, reverse=True):
        subprocess.run(["umount", "-l", mount.split()[1]], capture_output=True)
    for path in now.cgroups - before.cgroups:  # empty now that its processes are gone
        with contextlib.suppress(OSError):
            os.rmdir(path)
    for name in now.netns - before.netns:
        subprocess.run(["ip", "netns", "delete", name.split()[0]], capture_output=True)
    if added := now.etc_hosts - before.etc_hosts:
        kept = [line for line in Path("/etc/hosts").read_text().splitlines() if line not in added]
        Path("/etc/hosts").write_text("\n".join(kept) + "\n")
