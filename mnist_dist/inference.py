"""Use a saved model: evaluate it, predict digits in image files, export weights-only.

    mnist-dist evaluate --checkpoint RUN/checkpoints/best.pt --data-dir DIR
    mnist-dist predict --checkpoint RUN/checkpoints/best.pt digit.png ...
    mnist-dist export --checkpoint RUN/checkpoints/best.pt model.safetensors
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from . import checkpoint, data
from .errors import UsageError
from .model import build


def load_model(path: str) -> tuple[nn.Module, dict]:
    """The model saved in a checkpoint (safe load), in eval mode on the CPU, and its config."""
    state = checkpoint.load(path)
    cfg = state["config"]
    model = build(cfg["model"], cfg["hidden"])
    model.load_state_dict(state["model"])
    return model.eval(), cfg


def evaluate_checkpoint(path: str, data_dir: str | None = None, verify: bool = True):
    """Load a checkpoint and evaluate it on the test split: (model, saved config, images, labels, result).

    The data dir is the one given, else $MNIST_DATA_DIR, else the one saved in the checkpoint.
    """
    import os

    from .evaluate import evaluate

    model, cfg = load_model(path)
    data_dir = data_dir or os.environ.get("MNIST_DATA_DIR") or cfg["data_dir"]
    data.check_files(data_dir, verify)
    images, labels = data.load(data_dir, train=False, device=torch.device("cpu"))
    return model, cfg, images, labels, evaluate(model, images, labels)


INK = 0.2  # a pixel this bright (in [0, 1], after inversion) is part of a digit


def to_mnist(path: str, invert: bool | None = None) -> torch.Tensor:
    """An image file as a normalised [1, 28, 28] tensor that looks like an MNIST digit.

    MNIST digits are white on black, fit in a 20x20 box and are centred by their centre of mass in a
    28x28 frame. Images that are not 28x28 are cropped to the digit, scaled and centred that way.
    invert=None inverts when the border is mostly light (a dark digit on paper).
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:  # what is see-through is paper
                img = Image.alpha_composite(Image.new("RGBA", img.size, "white"), img.convert("RGBA"))
            img = img.convert("L")
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as err:
        raise UsageError(f"cannot read image {path}: {err}") from None
    x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).reshape(img.height, img.width).float() / 255
    border = torch.cat([x[0], x[-1], x[:, 0], x[:, -1]])
    if invert if invert is not None else border.mean() > 0.5:
        x = 1.0 - x
    if x.shape != (28, 28):
        x = fit_box(x)
    return ((x - data.MEAN) / data.STD).unsqueeze(0)


def fit_box(x: torch.Tensor) -> torch.Tensor:
    """Crop to the ink, scale the longer side to 20 pixels, centre the mass in 28x28 (as MNIST did)."""
    ink = (x > INK).nonzero()
    if len(ink) == 0:
        return torch.zeros(28, 28)
    (top, left), (bottom, right) = ink.min(0).values.tolist(), ink.max(0).values.tolist()
    crop = x[top:bottom + 1, left:right + 1]
    scale = 20 / max(crop.shape)
    size = [max(1, round(crop.shape[0] * scale)), max(1, round(crop.shape[1] * scale))]
    small = nn.functional.interpolate(crop[None, None], size=size, mode="area")[0, 0]
    out = torch.zeros(28, 28)
    rows, cols = torch.arange(size[0]).float(), torch.arange(size[1]).float()
    mass = small.sum().clamp(min=1e-6)
    cy, cx = (small.sum(1) @ rows / mass).item(), (small.sum(0) @ cols / mass).item()
    top, left = min(max(round(14 - cy), 0), 28 - size[0]), min(max(round(14 - cx), 0), 28 - size[1])
    out[top:top + size[0], left:left + size[1]] = small
    return out


@torch.no_grad()
def predict(model: nn.Module, images: list[str], invert: bool | None = None) -> list[tuple[int, float] | None]:
    """(digit, probability) for each image; None for an image with no ink at all (blank: no digit)."""
    batch = torch.stack([to_mnist(p, invert) for p in images])
    probs = model(batch).softmax(dim=1)
    best = probs.max(dim=1)
    blank = (batch * data.STD + data.MEAN).flatten(1).max(dim=1).values < INK
    return [None if empty else (digit, prob)
            for empty, digit, prob in zip(blank.tolist(), best.indices.tolist(), best.values.tolist(), strict=True)]


def export(path: str, out: str) -> dict:
    """Write the weights alone (safetensors): loadable with safetensors.torch.load_file, no pickle."""
    from safetensors.torch import save_file

    model, cfg = load_model(path)
    meta = {"model": cfg["model"], "hidden": str(cfg["hidden"]), "input": "1x28x28, (x/255 - 0.1307) / 0.3081"}
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    try:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, out, metadata=meta)
    except OSError as err:
        raise UsageError(f"cannot write {out}: {err.strerror or err}") from None
    return meta
