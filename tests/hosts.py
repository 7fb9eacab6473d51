"""Separate "hosts" on one machine: Linux namespaces joined by a virtual switch.

Each host is a process tree in its own network, UTS (hostname), mount and PID namespaces, with its
own /etc/hosts, /dev/shm and /tmp (the paths the tests need, the repository, the venv and pytest's
temporary folders, stay visible under /tmp); its one interface, eth0, is a veth whose other end sits on
a bridge in a namespace of its own (the switch). Addresses live only inside these namespaces.

    with Hosts(tmp_path, ["nodeA", "nodeB"], subnet="10.7.0") as (a, b):
        proc = a.start(["python", ...], env=...)     # a Popen of a command on host A
        b.cut(); b.mend()                              # unplug and plug in B's cable
        b.limit("1gbit")                               # an htb rate limit both ways

Nothing is left behind, also when the test fails or pytest is killed: every namespace is held by a
process that reads from a pipe of this process, and when the pipe closes it exits; the PID namespace
dies with it (the kernel kills every process in it), and the network namespace, its veth and the
mounts go with their last process. `Hosts.unavailable()` says why namespaces cannot be made here.
"""
from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from helpers import ROOT

NSENTER = ["nsenter", "--net", "--uts", "--mount", "--pid"]


def unavailable() -> str | None:
    """Why separate hosts cannot be made on this machine (None: they can)."""
    if os.geteuid() != 0:
        return "separate hosts need root (network, mount and PID namespaces; veth and bridge devices)"
    probe = subprocess.run(["unshare", "--net", "--uts", "--mount", "--pid", "--fork", "sh", "-c",
                            "ip link add v0 type veth peer name v1 && mount -t tmpfs tmpfs /tmp"],
                           capture_output=True, text=True)
    if probe.returncode:
        return f"cannot make namespaces, veths or mounts here (CAP_SYS_ADMIN/CAP_NET_ADMIN?): {probe.stderr.strip()}"
    return None


def _holder(args: list[str], script: str) -> tuple[subprocess.Popen, int]:
    """A process that holds new namespaces until our end of its stdin closes; its pid as seen from here."""
    proc = subprocess.Popen(["unshare", *args, "sh", "-c", f"{script}\necho ready\nexec cat >/dev/null"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True)
    if proc.stdout.readline().strip() != "ready":
        proc.kill()
        raise RuntimeError(f"a namespace holder did not start: {args} {script}")
    inner = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    return proc, int(inner[0]) if inner else proc.pid


def _kept_under_tmp() -> list[str]:
    """The folders under /tmp that the tests' commands need on every host."""
    import getpass
    keep = {str(ROOT), sys.prefix, os.path.join(tempfile.gettempdir(), f"pytest-of-{getpass.getuser()}"),
            os.environ.get("MNIST_DATA_DIR", "")}
    return sorted(p for p in keep if p and os.path.realpath(p).startswith("/tmp/") and os.path.exists(p))


class Host:
    def __init__(self, name: str, addr: str, index: int):
        self.name, self.addr, self.index = name, addr, index
        self.port = f"p{index}"  # its cable's end on the switch
        self.holder: subprocess.Popen | None = None
        self.started: list[subprocess.Popen] = []  # the nsenter wrappers of start(): they live outside the host
        self.pid = 0
        self.switch_pid = 0

    def cmd(self, argv: list[str]) -> list[str]:
        """argv as a command run on this host."""
        return [*NSENTER, f"--target={self.pid}", f"--wd={ROOT}", "--", *argv]

    def run(self, argv: list[str], **kwargs) -> subprocess.CompletedProcess:
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        return subprocess.run(self.cmd(argv), **kwargs)

    def sh(self, script: str) -> str:
        out = self.run(["sh", "-c", script])
        if out.returncode:
            raise RuntimeError(f"on {self.name}: {script}: {out.stderr.strip()}")
        return out.stdout

    def start(self, argv: list[str], **kwargs) -> subprocess.Popen:
        """argv on this host in the background, in its own session (killpg ends it)."""
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("stderr", subprocess.PIPE)
        kwargs.setdefault("text", True)
        proc = subprocess.Popen(self.cmd(argv), start_new_session=True, **kwargs)
        self.started.append(proc)
        return proc

    def pid_of(self, proc: subprocess.Popen, timeout: float = 30) -> int:
        """The pid on this host (inside its PID namespace) of the command that start() ran, once it runs.
        nsenter forks a child that enters the namespace and execs the command; until the exec that child
        still carries nsenter's command line (and the command's environment), so a lookup by command line
        can pick it, or the `sh -c` of the lookup itself. This follows the one child of this Popen."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for child in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split():
                try:
                    exe = os.readlink(f"/proc/{child}/exe")
                    status = Path(f"/proc/{child}/status").read_text()
                except OSError:  # gone, or not yet readable
                    continue
                if os.path.basename(exe) != "nsenter":  # exec'd: the command itself
                    nspid = next(line for line in status.splitlines() if line.startswith("NSpid:"))
                    return int(nspid.split()[-1])  # the innermost namespace's pid: this host's
            if proc.poll() is not None:
                raise AssertionError(f"the command on {self.name} ended (exit {proc.returncode}) before it was found")
            time.sleep(0.01)
        raise AssertionError(f"the command started on {self.name} did not run within {timeout:.0f} s")

    def kill_all(self) -> None:
        """kill -9 every process on this host but the one holding its namespaces (torchrun's workers run in
        sessions of their own: a killpg of the command does not reach them)."""
        self.run(["kill", "-9", "-1"])

    def _switch(self, script: str) -> None:
        subprocess.run(["nsenter", "--net", f"--target={self.switch_pid}", "sh", "-c", script], check=True)

    def cut(self) -> None:
        """Unplug the cable at the switch: packets from and to this host vanish (no error on either side)."""
        self._switch(f"ip link set {self.port} down")

    def mend(self) -> None:
        self._switch(f"ip link set {self.port} up")

    def limit(self, rate: str) -> None:
        """An htb rate limit on the cable, both ways ("1gbit", "100mbit")."""
        for where, dev in ((self.sh, "eth0"), (self._switch, self.port)):
            where(f"tc qdisc replace dev {dev} root handle 1: htb default 1 && "
                  f"tc class replace dev {dev} parent 1: classid 1:1 htb rate {rate} burst 256k quantum 60000")


class Hosts:
    """N hosts on one switch. `names` may repeat (hosts with the same hostname); `loopback_name`: hosts
    whose /etc/hosts maps their own name to 127.0.1.1, as Debian's and Ubuntu's installers do."""

    def __init__(self, tmp: Path, names: list[str], subnet: str = "10.7.0", loopback_name: tuple[int, ...] = (),
                 aliases: dict[str, int] | None = None):
        self.tmp = Path(tmp)
        self.hosts = [Host(name, f"{subnet}.{i + 1}", i) for i, name in enumerate(names)]
        self.loopback_name, self.aliases = loopback_name, aliases or {}
        self.switch: subprocess.Popen | None = None

    def hosts_file(self, host: Host) -> Path:
        lines = ["127.0.0.1 localhost"]
        if host.index in self.loopback_name:
            lines.append(f"127.0.1.1 {host.name}")
        for other in self.hosts:
            if not (other is host and host.index in self.loopback_name):
                lines.append(f"{other.addr} {other.name}")
        lines += [f"{self.hosts[i].addr} {alias}" for alias, i in self.aliases.items()]
        path = self.tmp / f"hosts-{host.index}"
        path.write_text("\n".join(lines) + "\n")
        return path

    def __enter__(self) -> list[Host]:
        try:
            self.switch, switch_pid = _holder(["--net", "--fork"], "ip link add br0 type bridge && ip link set br0 up")
            for host in self.hosts:
                self.start(host, switch_pid)
        except BaseException:
            self.__exit__()
            raise
        return self.hosts

    def start(self, host: Host, switch_pid: int) -> None:
        keep = _kept_under_tmp()
        mounts = ["mount -t tmpfs tmpfs /dev/shm", "mkdir /dev/shm/.tmp", "mount --bind /tmp /dev/shm/.tmp",
                  f"mount --bind {self.hosts_file(host)} /etc/hosts", "mount -t tmpfs tmpfs /tmp"]
        for path in keep:
            quoted = shlex.quote(path)
            mounts += [f"mkdir -p {quoted}", f"mount --bind /dev/shm/.tmp/{shlex.quote(path[5:])} {quoted}"]
        mounts += [
            "umount /dev/shm/.tmp",
            "rmdir /dev/shm/.tmp",
            f"hostname {shlex.quote(host.name)}",
            "ip link set lo up",
        ]
        host.holder, host.pid = _holder(
            ["--net", "--uts", "--mount", "--pid", "--fork", "--mount-proc", "--propagation", "private"],
            " && ".join(mounts),
        )
        host.switch_pid = switch_pid
        subprocess.run(["ip", "link", "add", "eth0", "netns", str(host.pid), "type", "veth", "peer", "name", host.port,
                        "netns", str(switch_pid)], check=True)
        host._switch(f"ip link set {host.port} master br0 && ip link set {host.port} up")
        host.sh(f"ip addr add {host.addr}/24 dev eth0 && ip link set eth0 up")
        deadline = time.monotonic() + 10  # the bridge port needs a moment before it forwards
        while host.run(["ip", "-o", "link", "show", "eth0"]).stdout.count("LOWER_UP") == 0:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{host.name}'s eth0 never came up")
            time.sleep(0.05)

    def __exit__(self, *exc) -> None:
        # the nsenter wrappers first: each sits outside the host and holds its namespaces while it lives (one
        # that a test stopped, or whose command it cannot reap, would keep them after the holder has gone)
        for proc in [p for h in self.hosts for p in h.started]:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for holder in [h.holder for h in self.hosts] + [self.switch]:
            if holder is not None and holder.poll() is None:
                holder.stdin.close()  # the holder exits; its namespaces and all they hold go with it
        for holder in [h.holder for h in self.hosts] + [self.switch]:
            if holder is not None:
                try:
                    holder.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(holder.pid, 9)
                    holder.wait()
