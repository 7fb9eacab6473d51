"""Shared fixtures: tiny synthetic MNIST-format data, an in-process gloo group, and nothing left behind: no
process after its test, and no process, namespace, veth, mount or /etc/hosts line after the session."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

import leftovers

# every process the tests start carries this mark (see leftovers.py); pytest-xdist's workers inherit the
# controller's, which checks for leftovers once they have all finished
WORKER = "PYTEST_XDIST_WORKER" in os.environ
if not (WORKER and leftovers.MARK in os.environ):
    os.environ[leftovers.MARK] = f"{os.getpid()}-{time.time_ns()}"
SESSION = os.environ[leftovers.MARK]

# The suite tests the CPU path it asserts, also on a GPU machine (an empty value hides every GPU).
os.environ["CUDA_VISIBLE_DEVICES"] = ""
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from helpers import STARTED, write_idx  # noqa: E402


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """512 training and 200 test images."""
    folder = tmp_path_factory.mktemp("tiny-mnist")
    write_idx(folder, 512, 200)
    return folder


@pytest.fixture(scope="session")
def small_data(tmp_path_factory) -> Path:
    """2048 training images: a CNN run long enough to interrupt (256 steps at batch 8), and short."""
    folder = tmp_path_factory.mktemp("small-mnist")
    write_idx(folder, 2048, 200, seed=3)
    return folder


@pytest.fixture(scope="session")
def medium_data(tmp_path_factory) -> Path:
    """8192 training images: long enough (a few seconds) to interrupt a run in the middle."""
    folder = tmp_path_factory.mktemp("medium-mnist")
    write_idx(folder, 8192, 200, seed=1)
    return folder


@pytest.fixture(autouse=True)
def no_leftover_runs():
    """A failed test must not leave training processes behind (they would compete with later tests)."""
    yield
    while STARTED:
        proc = STARTED.pop()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture
def gloo_group():
    """A world-size-1 gloo process group in this process, and its Ranks."""
    from mnist_dist.distributed import DistEnv, Ranks, free_port

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        yield Ranks(DistEnv(0, 0, 1, "127.0.0.1", 0), torch.device("cpu"))
    finally:
        dist.destroy_process_group()


def pytest_sessionstart(session):
    if not WORKER:
        session.config.stash[BEFORE] = leftovers.Snapshot()


@pytest.hookimpl(trylast=True)  # after pytest-xdist has ended its workers
def pytest_sessionfinish(session, exitstatus):
    """After every fixture's teardown: anything the suite made that is still there fails the run."""
    before = session.config.stash.get(BEFORE, None)
    if before is None:
        return
    deadline = time.monotonic() + 10  # a daemon or process group told to stop may need a moment to exit
    while (found := leftovers.leftovers(SESSION, before)) and time.monotonic() < deadline:
        time.sleep(0.2)
    if found:
        leftovers.remove(SESSION, before)
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        message = "the suite left these behind (now removed):\n  " + "\n  ".join(found)
        if reporter:
            reporter.ensure_newline()
            reporter.write_sep("=", "LEFTOVERS", red=True)
            reporter.write_line(message)
        else:
            print(message)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


BEFORE = pytest.StashKey[leftovers.Snapshot]()


# the longest files first (from --durations), so that pytest-xdist's workers, a file each at a time, start on
# them and finish together; a file not named here runs after these
LONGEST_FIRST = ["test_resume", "test_hosts", "test_hang", "test_slurm", "test_exact", "test_compression",
                 "test_gpu_paths", "test_slowdown", "test_containers", "test_doctor", "test_train", "test_slurm_hosts",
                 "test_real_mnist", "test_profile", "test_launchers", "test_wandb"]


def pytest_collection_modifyitems(config, items):
    """Slurm and real-data tests are slow too (`make test-quick` leaves them out); the longest files first."""
    for item in items:
        if item.get_closest_marker("slurm") or item.get_closest_marker("realdata"):
            item.add_marker(pytest.mark.slow)
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: a file's own order is kept
