"""The classifiers: the seed's MLP (784 -> hidden ReLU -> 10) and a small CNN (`--model cnn`)."""
from __future__ import annotations

from torch import nn


def mlp(hidden: int = 128) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def cnn() -> nn.Module:
    """Two 3x3 conv blocks (batch norm, max pooling), then a dense head with dropout: ~0.42M parameters.

    Dropout draws from the torch RNG, which every checkpoint saves, so resuming stays exact. Batch norm
    and dropout depend on the per-rank batch, so 1 and N ranks agree statistically, not bit for bit
    (the MLP does).
    """
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),   # 32 x 14 x 14
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),  # 64 x 7 x 7
        nn.Flatten(), nn.Dropout(0.25), nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10),
    )


def build(name: str, hidden: int = 128) -> nn.Module:
    return cnn() if name == "cnn" else mlp(hidden)
