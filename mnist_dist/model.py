"""The classifiers: the seed's MLP (784 -> hidden ReLU -> 10) and a small CNN (`--model cnn`)."""
from __future__ import annotations

import torch
from torch import nn

from .errors import UsageError


def mlp(hidden: int = 128) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def cnn() -> nn.Module:
    """Two 3x3 conv blocks (batch norm, max pooling), then a dense head with dropout: ~0.42M parameters.

    Dropout draws from the torch RNG, which every checkpoint saves, so resuming stays exact. Batch norm
    and dropout depend on the per-rank batch, so 1 and N ranks agree statistically, not bit for bit;
    under --exact they do (exact.py normalises per piece and keys the dropout masks to the samples).
    """
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),   # 32 x 14 x 14
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),  # 64 x 7 x 7
        nn.Flatten(), nn.Dropout(0.25), nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10),
    )


def build(name: str, hidden: int = 128) -> nn.Module:
    return cnn() if name == "cnn" else mlp(hidden)


def n_parameters(name: str, hidden: int = 128) -> int:
    """How many parameters `build(name, hidden)` has, without building it."""
    if name == "cnn":
        return sum(p.numel() for p in cnn().parameters())
    return 28 * 28 * hidden + hidden + hidden * 10 + 10


def check_fits(name: str, hidden: int, device: torch.device) -> None:
    """Refuse a model that cannot fit before allocating it (an allocation that does not fail at once
    would be ended by the kernel's out-of-memory killer): weights, gradients and Adam's two moments."""
    n = n_parameters(name, hidden)
    need = 16 * n
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        try:
            with open("/proc/meminfo") as lines:
                meminfo = dict(line.split(":", 1) for line in lines)
            free = int(meminfo["MemAvailable"].split()[0]) * 1024
        except (OSError, KeyError, ValueError):
            return  # no way to know here: the allocation itself will say
    if need > free:
        raise UsageError(f"the model does not fit: --hidden {hidden} makes {n:,} parameters, "
                         f"{need / 1e9:.1f} GB with gradients and Adam's state, and {free / 1e9:.1f} GB are free on "
                         f"{device}; choose a smaller --hidden")
