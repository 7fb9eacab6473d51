"""What this CPU-only machine cannot run, faked in one place: GPUs, and checkpoints saved on a GPU.

- `fake_cuda(n)`: torch.cuda with n visible GPUs. Each GPU's random generator is a real CPU
  torch.Generator, so seeding, drawing, saving and restoring its state behave as on a GPU.
- `save_on_cuda(obj, path)`: torch.save that records every storage at 'cuda:0', as a GPU job's
  checkpoint is (loading it without map_location fails on this machine, as it would for a user).
- `nccl_flight_recorder(monkeypatch, dump)`: the process group reports the nccl backend, and NCCL's
  Flight Recorder dump returns `dump` (the generic one, which gloo uses, fails if asked).
- `nccl_collectives(monkeypatch, world_size)`: an nccl process group of `world_size` ranks whose
  collectives only record their names (the tensors may live on the 'meta' device): a list of them.
- `cuda_events(monkeypatch)`: torch.cuda.Event timed on the host: record() notes the time, elapsed_time()
  gives milliseconds; returns the list of synchronize() calls.
- `python tests/fakes.py GPUS -m MODULE ARGS...`: run MODULE in a process that sees GPUS fake GPUs
  (torchrun starts it like any script), to drive a real job through its device checks.
"""
from __future__ import annotations

import contextlib
import runpy
import sys
from types import SimpleNamespace
from collections.abc import Iterator

import torch


def install(n: int) -> dict:
    """Patch torch.cuda (and the module behind its RNG functions) to show n GPUs; returns what to undo."""
    import torch.cuda.random as cuda_random

    gens = [torch.Generator() for _ in range(n)]
    current = [0]

    def set_device(device) -> None:
        index = device.index if isinstance(device, torch.device) else int(device)
        if not 0 <= index < n:
            raise RuntimeError(f"CUDA error: invalid device ordinal {index}")
        current[0] = index

    patches = {
        (torch.cuda, "is_available"): lambda: n > 0,
        (torch.cuda, "device_count"): lambda: n,
        (torch.cuda, "current_device"): lambda: current[0],
        (torch.cuda, "set_device"): set_device,
        (torch.cuda, "is_initialized"): lambda: True,
        (torch.cuda, "_lazy_init"): lambda: None,
        (torch.cuda, "default_generators"): tuple(gens),
        (torch.cuda, "get_device_properties"): lambda device: SimpleNamespace(
            name="Fake GPU", uuid=f"GPU-fake-{device.index if isinstance(device, torch.device) else device}",
            total_memory=80 << 30),
        (cuda_random, "device_count"): lambda: n,
        (cuda_random, "current_device"): lambda: current[0],
        (cuda_random, "is_initialized"): lambda: True,
        (cuda_random, "_lazy_init"): lambda: None,
    }
    undo = {key: getattr(*key) for key in patches}
    for (module, name), value in patches.items():
        setattr(module, name, value)
    return undo


def uninstall(undo: dict) -> None:
    for (module, name), value in undo.items():
        setattr(module, name, value)


@contextlib.contextmanager
def fake_cuda(n: int) -> Iterator[tuple[torch.Generator, ...]]:
    """n fake GPUs for the block; yields their generators."""
    undo = install(n)
    try:
        yield torch.cuda.default_generators
    finally:
        uninstall(undo)


def nccl_flight_recorder(monkeypatch, dump: bytes) -> None:
    import torch.distributed as dist
    from torch._C import _distributed_c10d as c10d

    def generic():
        raise AssertionError("the generic Flight Recorder was dumped for an NCCL process group")
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(c10d, "_dump_nccl_trace_json", lambda *a, **k: dump)
    monkeypatch.setattr(c10d, "_dump_fr_trace_json", generic)


def nccl_collectives(monkeypatch, world_size: int) -> list[str]:
    import torch.distributed as dist

    calls: list[str] = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: world_size)
    for name in ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce_scatter"):
        monkeypatch.setattr(dist, name, lambda *args, _name=name, **kwargs: calls.append(_name))
    # point-to-point: what each op sends or receives, and to whom (nothing to wait for)
    monkeypatch.setattr(dist, "P2POp", lambda op, tensor, peer: SimpleNamespace(op=op, tensor=tensor, peer=peer))
    monkeypatch.setattr(dist, "batch_isend_irecv", lambda ops: calls.extend(
        f"{'send' if op.op is dist.isend else 'recv'} {op.tensor.numel()} to/from {op.peer}" for op in ops) or [])
    return calls


def cuda_events(monkeypatch) -> list[object]:
    import time

    synced: list[object] = []

    class Event:
        def __init__(self, enable_timing: bool = False):
            assert enable_timing, "an event without timing cannot be measured"
            self.at: float | None = None

        def record(self, stream=None) -> None:
            self.at = time.perf_counter()

        def synchronize(self) -> None:
            synced.append(self)

        def elapsed_time(self, end: Event) -> float:
            assert self.at is not None and end.at is not None, "both events must be recorded"
            return (end.at - self.at) * 1000

    monkeypatch.setattr(torch.cuda, "Event", Event)
    return synced


_ON_CUDA = [False]


def _tag(storage) -> str | None:
    return "cuda:0" if _ON_CUDA[0] else None


def _untag(storage, location: str):
    return None  # loading is torch's own business: a real 'cuda:0' tag goes to its CUDA loader


torch.serialization.register_package(0, _tag, _untag)  # asked before torch's own taggers


def save_on_cuda(obj, path) -> None:
    """torch.save(obj, path) with every storage recorded at 'cuda:0'."""
    _ON_CUDA[0] = True
    try:
        torch.save(obj, path)
    finally:
        _ON_CUDA[0] = False


if __name__ == "__main__":  # python tests/fakes.py GPUS -m MODULE ARGS...
    gpus, flag, module, *args = sys.argv[1:]
    assert flag == "-m", "usage: python tests/fakes.py GPUS -m MODULE ARGS..."
    install(int(gpus))
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
