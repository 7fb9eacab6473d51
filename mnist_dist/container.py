"""What the job needs from a container, checked where it matters:

- torchrun as PID 1 (a container started without an init): the kernel drops kill -9 sent to a PID
  namespace's first process from inside it, and every signal it has no handler for. A node cut off from
  its rendezvous could then never be ended by the hang watchdog. Each node's first rank says so at
  start-up, with the fix; `mnist-dist init -- torchrun ...` is one (`init_main`).
- a small /dev/shm (Docker's default is 64 MB): `shm_shortfall` says why the shared-memory exchange
  is not used and how to give it more.
- no writable HOME (a random UID, a read-only root): `home_elsewhere` points W&B's and matplotlib's
  config, cache and data folders at the run dir, where the user has not chosen them.
"""
from __future__ import annotations

import contextlib
import ctypes
import inspect
import os
import signal
import subprocess
import sys
from pathlib import Path

INIT_FIXES = ("docker run --init, tini, Kubernetes shareProcessNamespace: true, or this project's own: "
              "mnist-dist init -- torchrun ...")


def agent_is_pid1(environ=os.environ) -> bool:
    """Whether this rank's parent is torchrun's agent running as PID 1 of its PID namespace."""
    if os.getppid() != 1 or "TORCHELASTIC_RUN_ID" not in environ:
        return False
    try:
        args = Path("/proc/1/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return False
    return any(a.endswith(("torch.distributed.run", "torchrun")) for a in args)


def pid1_warning() -> str | None:
    """The start-up line for a node whose torchrun is PID 1 (None where it is not)."""
    if not agent_is_pid1():
        return None
    return ("torchrun is PID 1 in this container: nothing inside it can end torchrun if this node is cut off "
            "from its rendezvous (PID 1 ignores kill -9 from inside; it would wait about 15 minutes for TCP), and "
            f"it drops signals it has no handler for (Slurm's USR1); start it under an init: {INIT_FIXES}")


def free_bytes(folder: str) -> int | None:
    """What a user may still write in `folder`'s file system (None: no such folder here)."""
    try:
        st = os.statvfs(folder)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def shm_shortfall(folder: str, needed: int) -> str:
    """Why the shared-memory block could not be made in `folder`, and what to do."""
    free = free_bytes(folder)
    if free is None:
        return f"{folder} is not usable here, so the ranks average their gradients through gloo"
    return (f"{folder} has {free / 2**20:.1f} MB free and the shared-memory gradient exchange needs "
            f"{needed / 2**20:.1f} MB, so the ranks average through gloo (slower on one host); give it more: "
            f"docker run --shm-size=256m, or in Kubernetes a memory-backed emptyDir mounted at {folder}")


HOME_DIRS = {  # variable -> folder under RUN_DIR/.home
    "WANDB_CONFIG_DIR": "wandb/config", "WANDB_CACHE_DIR": "wandb/cache", "WANDB_DATA_DIR": "wandb/data",
    "MPLCONFIGDIR": "matplotlib",
}


def home_usable(environ=os.environ) -> bool:
    home = environ.get("HOME", "")
    return bool(home) and os.path.isdir(home) and os.access(home, os.W_OK | os.X_OK)


def home_elsewhere(run_dir: str | os.PathLike, environ=os.environ) -> list[str]:
    """Where HOME is not usable, W&B's and matplotlib's folders go under RUN_DIR/.home (a user's own
    setting of any of them wins). Returns the variables set."""
    if home_usable(environ):
        return []
    chosen = []
    for var, sub in HOME_DIRS.items():
        path = Path(run_dir) / ".home" / sub
        if var not in environ:
            try:
                path.mkdir(parents=True, exist_ok=True)
            except OSError:  # an unwritable run dir is reported where the run claims it
                continue
            environ[var] = str(path)
            chosen.append(var)
    return chosen


# --- mnist-dist init ---------------------------------------------------------------------------------
PR_SET_CHILD_SUBREAPER = 36
FORWARDED = [s for s in signal.Signals if s not in (signal.SIGKILL, signal.SIGSTOP, signal.SIGCHLD)
             and s not in (signal.SIGTTIN, signal.SIGTTOU, signal.SIGTSTP, signal.SIGWINCH)]


def init_main(argv: list[str]) -> int:
    """`mnist-dist init -- COMMAND ...`: run COMMAND as the child of a minimal init, for containers started
    without one (docker run without --init, a pod without shareProcessNamespace). It passes every signal it
    can catch on to the command (docker stop's SIGTERM, Slurm's USR1), reaps the orphans that PID 1
    inherits, and exits with the command's code (128 + N if signal N ended it). The command is then not
    PID 1, so the hang watchdog can end a torchrun that a partition cut off."""
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv or argv[0] in ("-h", "--help"):
        print(inspect.cleandoc(init_main.__doc__).replace("`", ""), file=sys.stderr if not argv else sys.stdout)
        return 0 if argv else 2
    with contextlib.suppress(OSError, AttributeError):  # orphans come to us also where we are not PID 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    started: list[subprocess.Popen] = []
    early: list[int] = []  # signals that came while the command was being started

    def forward(signum: int, _frame) -> None:
        if started:
            started[0].send_signal(signum)
        else:
            early.append(signum)
    for sig in FORWARDED:  # before the command starts: a signal that comes early must not end the init
        with contextlib.suppress(OSError, ValueError):  # one Python may not handle
            signal.signal(sig, forward)
    try:
        child = subprocess.Popen(argv)
    except OSError as err:
        print(f"mnist-dist: error: mnist-dist init cannot start {argv[0]}: {err.strerror}", file=sys.stderr)
        return 127
    started.append(child)
    for signum in early:
        child.send_signal(signum)
    while True:
        pid, status = os.wait()  # any child: the command, or an orphan handed to PID 1
        if pid == child.pid:
            code = os.waitstatus_to_exitcode(status)
            return 128 - code if code < 0 else code
