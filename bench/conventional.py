"""The conventional pipeline, for comparison: torchvision transforms (ToTensor + Normalize) per sample,
DataLoader + DistributedSampler, DDP, the same MLP, Adam and global batch. Run by bench/bench.py as
`torchrun --nproc-per-node N bench/conventional.py DATA_DIR EPOCHS cpu|cuda` (prints JSON on rank 0);
on cuda each batch is copied to the rank's GPU, as such pipelines do.
Also times the raw exchanges of the MLP's gradients (101,770 floats) between these processes: gloo's
all_reduce, and mnist-dist's shared-memory average (what its CPU ranks on one host use)."""
import json
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler
from torchvision import datasets, transforms

from mnist_dist.host_allreduce import attach
from mnist_dist.model import mlp


def main(data_dir: str, epochs: int, device: str = "cpu", global_batch: int = 64) -> None:
    dist.init_process_group("nccl" if device == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if device == "cuda" else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
    ds = datasets.MNIST(data_dir, train=True, download=False, transform=tf)
    sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=0)
    loader = DataLoader(ds, batch_size=global_batch // world, sampler=sampler, pin_memory=dev.type == "cuda")
    torch.manual_seed(0)
    model = DDP(mlp(128).to(dev), device_ids=[dev.index] if dev.type == "cuda" else None)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    times = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        t = time.perf_counter()
        for x, y in loader:
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    grads = torch.ones(sum(p.numel() for p in model.parameters()), device=dev)
    raw = {"allreduce_ms": time_ms(lambda: dist.all_reduce(grads))}
    shared = attach(rank, world, grads.numel()) if world > 1 and dev.type == "cpu" else None
    if shared:
        raw["shm_average_ms"] = time_ms(lambda: shared.average(grads))
    if rank == 0:
        print(json.dumps({"epoch_s": min(times), "params": grads.numel(), **raw}))
    dist.destroy_process_group()


def time_ms(fn, warmup: int = 20, n: int = 200) -> float:
    for _ in range(warmup):
        fn()
    dist.barrier()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e3


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), *sys.argv[3:4])
