"""MNIST as tensors on the training device, verified against the official SHA-256 pins.

`fetch` checks (and, when allowed, downloads) the raw files: the training job runs it on local rank
0 while the others wait for its verdict; `mnist-dist download --data-dir DIR` runs it on a login node.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from torch.utils.data import DistributedSampler

from . import locks
from .errors import UsageError

# The official MNIST release, uncompressed (what torchvision leaves in ROOT/MNIST/raw).
SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
MEAN, STD = 0.1307, 0.3081  # of the training pixels, in [0, 1] units


def raw_dir(data_dir: str | os.PathLike) -> Path:
    return Path(data_dir) / "MNIST" / "raw"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def file_problem(data_dir: str, verify: bool = True) -> str | None:
    """What is wrong with the raw files, naming the folder and the fix; None when all four are there
    (and, with `verify`, the official ones)."""
    folder = raw_dir(data_dir)
    for name, want in SHA256.items():
        path = folder / name
        if not path.is_file():
            return (f"MNIST file {name} is missing in {folder}: run `mnist-dist download --data-dir {data_dir}` "
                    f"on a machine with internet, or put the four IDX files in {folder}")
        if verify and sha256(path) != want:
            return (f"MNIST file {path} does not match the official SHA-256 (corrupt or partial download?): "
                    f"delete it and run `mnist-dist download --data-dir {data_dir}`, or copy a good file there")
    return None


def check_files(data_dir: str, verify: bool = True) -> None:
    """Raise UsageError if a raw file is missing or not the official one."""
    problem = file_problem(data_dir, verify)
    if problem:
        raise UsageError(problem)


def fetch(data_dir: str, download: bool, verify: bool = True) -> None:
    """Make sure the raw files are present and intact, downloading them if allowed and needed.

    A download happens under a lock in the data dir: processes that share it (each node's local rank
    0) take turns, and one that finds the files missing or incomplete waits for a download under way
    and checks again, instead of checksumming or fetching a file that another one is still writing."""
    problem = file_problem(data_dir, verify)
    if problem is None:
        return
    if not download:
        raise UsageError(problem)
    folder = raw_dir(data_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"could not download MNIST into {folder}: cannot create it ({err.strerror}); on an "
                         f"offline machine put the four IDX files there and pass --no-download") from None
    with locks.waiting(folder / ".lock", f"waiting for another process to finish downloading MNIST into {folder}"):
        if file_problem(data_dir, verify) is None:  # the download we waited for brought them
            return
        download_mnist(data_dir)
    check_files(data_dir, verify)


def download_mnist(data_dir: str) -> None:
    from torchvision.datasets import MNIST  # imported only when a download is needed

    try:
        MNIST(data_dir, train=True, download=True)
        MNIST(data_dir, train=False, download=True)
    except Exception as err:  # network, disk, mirror errors: all end the same way for the user
        reason = " ".join(str(err).split())[:300]  # one line, however long the mirror's story
        raise UsageError(
            f"could not download MNIST into {raw_dir(data_dir)} ({type(err).__name__}: {reason}); on an "
            f"offline machine put the four IDX files there and pass --no-download"
        ) from None


def load(data_dir: str, train: bool, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """All images of a split as normalised float32 [N, 1, 28, 28] and int64 labels, on `device`."""
    from torchvision.datasets import MNIST

    try:
        ds = MNIST(data_dir, train=train, download=False)
    except Exception as err:  # a malformed IDX header or a short file
        raise UsageError(f"cannot read MNIST from {raw_dir(data_dir)}: {err}") from None
    images = ds.data.to(device=device, non_blocking=True).unsqueeze(1).float().div_(255.0)
    images.sub_(MEAN).div_(STD)
    return images, ds.targets.to(device)


def to_pixels(images: torch.Tensor) -> torch.Tensor:
    """Normalised images back to [N, 28, 28] ink in [0, 1] on the CPU, for pictures."""
    return (images.detach().float().reshape(-1, 28, 28) * STD + MEAN).clamp_(0, 1).cpu()


def epoch_indices(n: int, rank: int, world_size: int, seed: int, epoch: int, device: torch.device) -> torch.Tensor:
    """This rank's sample order for one epoch, from DistributedSampler (shuffled by seed and epoch).

    Rank r takes positions r, r+W, r+2W, ... of one global permutation, so with a fixed global batch
    the union of all ranks' k-th batches is the same set of samples for any world size.
    """
    sampler = DistributedSampler(range(n), num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    return torch.tensor(list(sampler), dtype=torch.long, device=device)


def exact_epoch_indices(n: int, rank: int, world_size: int, seed: int, epoch: int, batch_size: int,
                        device: torch.device) -> torch.Tensor:
    """This rank's sample order for one epoch of --exact: the same permutation as above, padded (with its
    first samples, as DistributedSampler pads) to whole global batches, of which rank r takes the r-th
    contiguous share, so its pieces (exact.py) are the same global positions for any world size."""
    order = epoch_indices(n, 0, 1, seed, epoch, device)
    steps = -(-n // batch_size)
    order = torch.cat([order, order[:steps * batch_size - n]])
    return order.view(steps, world_size, batch_size // world_size)[:, rank].reshape(-1)
