"""The shared-memory gradient exchange of CPU ranks on one host (its use in training is in test_train)."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mnist_dist import host_allreduce
from mnist_dist.distributed import free_port


def shm_files() -> set[str]:
    return {n for n in os.listdir(host_allreduce.SHM_DIR) if n.startswith("mnist-dist-")}


def exchange(rank: int, world: int, port: int, out: dict) -> None:
    """Each rank averages rank-dependent vectors several times, as DDP calls the hook once per bucket."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    shared = host_allreduce.attach(rank, world, numel=1000)
    results = []
    for call in range(5):
        n = 1000 if call % 2 else 300  # buckets of different sizes share the slots
        g = torch.Generator().manual_seed(100 * call + rank)
        results.append(shared.average(torch.randn(n, generator=g)))
    out[rank] = torch.cat(results)
    dist.destroy_process_group()


def test_three_ranks_get_the_same_mean_and_no_file_is_left():
    before = shm_files()
    world, port = 3, free_port()
    out = mp.Manager().dict()
    mp.start_processes(exchange, args=(world, port, out), nprocs=world, start_method="spawn")
    want = torch.cat([torch.stack([torch.randn(1000 if call % 2 else 300,
                                               generator=torch.Generator().manual_seed(100 * call + r))
                                   for r in range(world)]).mean(0) for call in range(5)])
    assert all(torch.equal(out[r], out[0]) for r in range(world)), "every rank holds bit-identical averages"
    assert torch.allclose(out[0], want, atol=1e-6)
    assert shm_files() == before, "the block's file is unlinked once every rank has mapped it"


def test_a_dead_peer_is_noticed(gloo_group):
    """A rank whose peer has exited stops waiting with an error naming it (the launcher then ends the job)."""
    shared = host_allreduce.attach(rank=0, world_size=1, numel=10)
    shared.world_size = 2  # pretend a second rank that never publishes: its pid is one that has exited
    shared.seqs = [0, 0]
    child = os.fork()
    if child == 0:
        os._exit(0)
    os.waitpid(child, 0)
    shared.pids = [os.getpid(), child]
    with pytest.raises(ConnectionError, match=f"rank 1 \\(pid {child}\\) exited"):
        shared.wait_for(1)


def test_no_shared_memory_means_the_process_group_is_used(gloo_group, monkeypatch, tmp_path):
    monkeypatch.setattr(host_allreduce, "SHM_DIR", str(tmp_path / "missing"))
    assert host_allreduce.attach(rank=0, world_size=1, numel=1000) is None
