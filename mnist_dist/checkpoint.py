"""Checkpoints: the training state, one dict of plain tensors and numbers, written atomically and
loaded without unpickling code; when rank 0 saves (`Checkpointer`) and where a run resumes (`resume_point`).

Layout: RUN_DIR/checkpoints/ckpt-<step>.pt (the last K) and best.pt (a hard link to the best by test
accuracy). Rank 0 writes and reads; the other ranks get the state from it. `mnist-dist
evaluate|predict|export --checkpoint PATH` read the same files.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import pickle
import random
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Callable

import torch

from .config import TRAJECTORY_FIELDS, Config, flag
from .errors import CheckpointError, UsageError, WriteFailed, first_line, warn
from .files import atomic_write, atomic_write_text

FORMAT_VERSION = 1
NAME = re.compile(r"ckpt-(\d+)\.pt$")
DEFAULTS = Config().to_dict()


@dataclass
class EpochTally:
    """The current epoch so far, over all ranks: what the epoch's line and record report."""

    loss_sum: float = 0.0  # the sum of the steps' mean losses
    steps: int = 0
    correct: float = 0.0   # right answers on the training batches
    samples: int = 0

    def add(self, losses: list[float], correct: float, samples: int) -> None:
        """Count one sync interval: the mean loss of each of its steps, its right answers and samples."""
        self.loss_sum += sum(losses)
        self.steps += len(losses)
        self.correct += correct
        self.samples += samples

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / max(self.steps, 1)

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.samples, 1)


@dataclass
class TrainState:
    """Where training stands: everything besides the model, the optimizer and the RNGs that a resumed
    run needs to continue exactly where the saved one was."""

    epoch: int = 0            # epochs finished
    batch_in_epoch: int = 0   # the next batch of the current epoch
    step: int = 0             # training steps finished
    best_acc: float = -1.0    # the best test accuracy so far (-1: none yet)
    epoch_tally: EpochTally = field(default_factory=EpochTally)
    wandb_run_id: str | None = None
    metrics: list[dict] = field(default_factory=list)  # every metrics.jsonl record so far

    def to_checkpoint(self) -> dict:
        return {**{f.name: getattr(self, f.name) for f in dataclasses.fields(self)},
                "epoch_tally": list(dataclasses.astuple(self.epoch_tally)), "metrics": list(self.metrics)}

    @classmethod
    def from_checkpoint(cls, ckpt: dict) -> TrainState:
        values = {f.name: ckpt[f.name] for f in dataclasses.fields(cls)}
        return cls(**{**values, "epoch_tally": EpochTally(*values["epoch_tally"]), "metrics": list(values["metrics"])})


REQUIRED = ("format_version", "model", "optimizer", "rng", "config", "world_size",
            *(f.name for f in dataclasses.fields(TrainState)))


def snapshot(state: TrainState, model: torch.nn.Module, opt: torch.optim.Optimizer, cfg: Config, world_size: int,
             device: torch.device, compression: dict | None = None) -> dict:
    """The checkpoint of this moment: the inverse of `restore` (and of `compression.PowerSGD.restore`: every
    rank's gradient compression state, where it keeps one)."""
    return {"format_version": FORMAT_VERSION, "model": model.state_dict(), "optimizer": opt.state_dict(),
            "rng": rng_state(device), "config": cfg.to_dict(), "world_size": world_size, **state.to_checkpoint(),
            **({"compression": compression} if compression is not None else {})}


def restore(ckpt: dict, model: torch.nn.Module, opt: torch.optim.Optimizer, device: torch.device) -> None:
    """The inverse of `snapshot` (with TrainState.from_checkpoint): put a loaded checkpoint (CPU
    tensors) into the model and optimizer, which live on `device` (load_state_dict copies there), and
    restore this rank's random generators."""
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    set_rng_state(ckpt["rng"], device)


# --- files ------------------------------------------------------------------------------------------

def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def step_checkpoints(ckpt_dir: Path) -> list[Path]:
    """The ckpt-<step>.pt files, oldest first."""
    found = [(int(m.group(1)), p) for p in ckpt_dir.glob("ckpt-*.pt") if (m := NAME.search(p.name)) and p.is_file()]
    return [p for _, p in sorted(found)]


def save(ckpt: dict, ckpt_dir: Path, keep_last: int, is_best: bool) -> Path:
    """Save `ckpt` as ckpt-<step>.pt, point best.pt at it if best, keep only the last `keep_last`.
    Serialised in memory first, so that a full disk fails in the write with its real reason."""
    path = ckpt_dir / f"ckpt-{ckpt['step']:08d}.pt"
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    try:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise WriteFailed(path, err) from None
    atomic_write(path, buf.getbuffer())
    try:
        if is_best:
            link = ckpt_dir / f".best.pt.tmp{os.getpid()}"
            link.unlink(missing_ok=True)
            os.link(path, link)  # same inode: costs nothing and survives pruning of the step file
            os.replace(link, ckpt_dir / "best.pt")
        for old in step_checkpoints(ckpt_dir)[:-keep_last]:
            old.unlink(missing_ok=True)
    except OSError as err:
        raise WriteFailed(ckpt_dir / "best.pt", err) from None
    return path


def load(path: str | os.PathLike) -> dict:
    """Load a checkpoint safely: weights_only refuses any pickled callable before it can run.

    Always onto the CPU, whatever device saved it or will train on: the RNG states must be CPU tensors
    (torch.set_rng_state refuses others), and no GPU error (out of memory, a busy or missing device)
    can happen here and be mistaken for a corrupt file. `restore` copies onto the device."""
    path = Path(path)
    try:
        with warnings.catch_warnings():  # torch warns about odd pickle protocols before failing anyway
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except pickle.UnpicklingError as err:
        if "GLOBAL" in str(err):  # a reference to a class or function: code, refused before it runs
            raise CheckpointError(
                f"checkpoint {path} refused: it carries pickled code or objects, not just tensors "
                f"and numbers (nothing in it was run)", unsafe=True) from None
        raise CheckpointError(f"checkpoint {path} is corrupt ({first_line(err, 200)})") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as err:
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({first_line(err, 200)})") from None
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in REQUIRED):
        raise CheckpointError(f"checkpoint {path} is not an mnist-dist checkpoint (keys missing)")
    if ckpt["format_version"] != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format {ckpt['format_version']}, this version reads {FORMAT_VERSION}"
        )
    return ckpt


def newest_valid(ckpt_dir: Path) -> tuple[dict, Path] | None:
    """The newest checkpoint that loads; corrupt ones are reported and skipped, unsafe ones refused."""
    for path in reversed(step_checkpoints(ckpt_dir)):
        try:
            return load(path), path
        except CheckpointError as err:
            if err.unsafe:
                raise
            warn(f"skipping {err}")
    return None


def resume_hint(ckpt_dir: Path) -> str:
    """What a user whose run stopped on a failed write should know about its checkpoints."""
    found = step_checkpoints(ckpt_dir)
    return (f"the newest good checkpoint is {found[-1]}: free some space (or mend the file system) and run the "
            f"same command again to resume") if found else "no checkpoint was written yet"


# --- when rank 0 saves, and where a run resumes -----------------------------------------------------

class Checkpointer:
    """Rank 0 writes checkpoints; on other ranks `save` writes nothing (every rank decides alike)."""

    def __init__(self, cfg: Config, enabled: bool):
        self.dir, self.every, self.keep_last, self.enabled = (
            checkpoint_dir(cfg.run_dir),
            cfg.ckpt_every,
            cfg.keep_last,
            enabled,
        )

    def due(self, step: int) -> bool:
        """A --ckpt-every step: the loop syncs there, and saves."""
        return self.every > 0 and step % self.every == 0

    def should_save(self, step: int, stopping: bool, epoch_over: bool) -> bool:
        """Save at this sync point? At a stop signal and every --ckpt-every steps, except at an epoch's
        end, whose own checkpoint (which knows the test accuracy) is saved then."""
        return not epoch_over and (stopping or self.due(step))

    def clear(self) -> None:
        """Remove the run dir's checkpoints (--no-resume --overwrite)."""
        if self.enabled:
            for path in (*step_checkpoints(self.dir), self.dir / "best.pt"):
                path.unlink(missing_ok=True)

    def save(self, make: Callable[[], dict], is_best: bool = False) -> Path:
        if not self.enabled:
            return self.dir / "(written by rank 0, in its run dir)"
        return save(make(), self.dir, self.keep_last, is_best)


SAVE_NOTE = ".newest-checkpoint"  # in the run dir of every node: "STEP HOST" of rank 0's newest save


def note_save(run_dir: str | os.PathLike, step: int, host: str) -> None:
    """Note on this node that rank 0 saved a checkpoint at `step` on `host` (a few bytes, atomically)."""
    path = Path(run_dir) / SAVE_NOTE
    try:
        path.parent.mkdir(parents=True, exist_ok=True)  # another node's run dir may hold nothing yet
    except OSError as err:
        raise WriteFailed(path, err) from None
    atomic_write_text(path, f"{step} {host}\n")


def noted_save(run_dir: str | os.PathLike) -> tuple[int, str]:
    """The newest save this node noted, (0, "") if none (or an unreadable note)."""
    try:
        step, host = (Path(run_dir) / SAVE_NOTE).read_text().split()
        return int(step), host
    except (OSError, ValueError):
        return 0, ""


def resume_point(cfg: Config) -> dict | None:
    """The checkpoint to resume from, per --resume, checked against this run's config (rank 0 reads it)."""
    ckpt_dir = checkpoint_dir(cfg.run_dir)
    if cfg.resume == "never":
        if step_checkpoints(ckpt_dir) and not cfg.overwrite:
            raise UsageError(f"{ckpt_dir} holds checkpoints: drop --no-resume to resume, pass --overwrite "
                             f"to start over, or choose another --run-dir")
        return None
    if cfg.resume == "auto":
        found = newest_valid(ckpt_dir)
        ckpt = found[0] if found else None
    else:
        ckpt = load(cfg.resume)
    saved = {**DEFAULTS, **ckpt["config"]} if ckpt is not None else {}  # a field newer than the checkpoint: its default
    differ = [f for f in TRAJECTORY_FIELDS if ckpt is not None and saved[f] != getattr(cfg, f)]
    if differ:
        diffs = ", ".join(f"--{flag(f)} {saved[f]} (saved) vs {getattr(cfg, f)} (now)" for f in differ)
        raise UsageError(f"cannot resume from the checkpoint in {ckpt_dir}: {diffs}; use another --run-dir "
                         f"or --no-resume --overwrite")
    return ckpt


def fingerprint(state_dict: dict[str, torch.Tensor], digits: int = 12) -> str:
    """The first `digits` hex digits of the SHA-256 of a state dict (names, dtypes, shapes and bytes, in
    order): runs with equal fingerprints hold the same weights, bit for bit."""
    h = hashlib.sha256()
    for name, t in state_dict.items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name} {t.dtype} {tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:digits]


# --- random number generator states, as plain tensors and numbers -------------------------------

def rng_state(device: torch.device) -> dict:
    """This process's generators. Every rank seeds and draws alike, so rank 0's states (which the
    checkpoint saves) are every rank's; on a GPU that is the generator of this rank's own device, not
    of every device the process can see (another job may see more or fewer of them)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    import numpy as np  # a dependency of the package

    state["numpy"] = numpy_rng(np.random.get_state())
    return state


def numpy_rng(state: tuple) -> dict:
    """A numpy generator's state (`get_state()`) as tensors and numbers."""
    _, keys, pos, has_gauss, gauss = state
    return {"keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos), "has_gauss": int(has_gauss),
            "gauss": float(gauss)}


def numpy_rng_tuple(saved: dict) -> tuple:
    """The inverse of `numpy_rng`, for `set_state()`."""
    return "MT19937", saved["keys"].numpy().astype("uint32"), saved["pos"], saved["has_gauss"], saved["gauss"]


def set_rng_state(state: dict, device: torch.device) -> None:
    """Restore the states saved by `rng_state` (CPU tensors, as `load` returns them) on this rank."""
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
    if "numpy" in state:
        import numpy as np
        np.random.set_state(numpy_rng_tuple(state["numpy"]))
