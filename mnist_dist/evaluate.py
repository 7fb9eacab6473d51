"""Test-set evaluation of an unwrapped model (no DDP collectives): rank 0 runs it after each epoch;
`mnist-dist evaluate --checkpoint PATH` runs it on a saved model."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import progress


@dataclass
class Evaluation:
    loss: float
    acc: float
    per_class_acc: list[float]
    confusion: torch.Tensor   # [10, 10] counts, rows = true digit, columns = predicted digit
    predictions: torch.Tensor  # [N] predicted digit for every test image
    probabilities: torch.Tensor  # [N] the probability given to that prediction

    def as_record(self) -> dict:
        return {"test_loss": self.loss, "test_acc": self.acc, "per_class_acc": self.per_class_acc}


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500) -> Evaluation:
    """Every test image exactly once (no sampler padding), in batches small enough that the hang
    watchdog sees progress often (a 500-image CNN batch is a fraction of a second on one CPU core)."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=images.device)
    preds, probs = [], []
    for start in range(0, len(labels), batch_size):
        logits = model(images[start:start + batch_size])
        y = labels[start:start + batch_size]
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum")
        p, k = logits.softmax(dim=1).max(dim=1)
        preds.append(k)
        probs.append(p)
        progress.made()  # a long evaluation is progress, not a hang
    model.train(was_training)
    pred = torch.cat(preds)
    confusion = torch.bincount(labels * 10 + pred, minlength=100).reshape(10, 10).cpu()  # host sync
    per_class = (confusion.diag() / confusion.sum(1).clamp(min=1)).tolist()
    n = len(labels)
    return Evaluation(loss_sum.item() / n, confusion.diag().sum().item() / n, per_class, confusion,
                      pred.cpu(), torch.cat(probs).cpu())
