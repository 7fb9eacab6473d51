"""Shared fixtures: tiny synthetic MNIST-format data, an in-process gloo group, and no processes left behind."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

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
