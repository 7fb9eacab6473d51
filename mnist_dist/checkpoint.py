"""Checkpoints: one dict of plain tensors and numbers, written atomically, loaded without unpickling code.

Layout: RUN_DIR/checkpoints/ckpt-<step>.pt (the last K) and best.pt (a hard link to the best by test
accuracy). Rank 0 writes; every rank reads. `mnist-dist evaluate|predict|export --checkpoint PATH`
read the same files.
"""
from __future__ import annotations

import io
import os
import pickle
import random
import re
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from .config import UsageError
from .preempt import EXIT_WRITE_FAILED
from .watchdog import made_progress

FORMAT_VERSION = 1
NAME = re.compile(r"ckpt-(\d+)\.pt$")
REQUIRED = ("format_version", "model", "optimizer", "epoch", "batch_in_epoch", "step", "config")


class WriteFailed(Exception):
    """A file of the run could not be written: disk full, quota, an I/O error, permissions changed.
    Nothing already saved is touched; the temporary file is removed."""

    exit_code = EXIT_WRITE_FAILED

    def __init__(self, path: Path, err: OSError):
        super().__init__(f"cannot write {path}: {err.strerror or err}")
        self.newest = ""  # the newest good checkpoint, said by whoever knows the run dir

    def __str__(self) -> str:
        return super().__str__() + (f"; {self.newest}" if self.newest else "")


def newest_note(ckpt_dir: Path) -> str:
    found = listed(ckpt_dir)
    return (f"the newest good checkpoint is {found[-1]}: free some space (or mend the file system) and run the "
            f"same command again to resume") if found else "no checkpoint was written yet"


class CheckpointError(UsageError):
    """A checkpoint that cannot be used; `unsafe` means it tried to smuggle in code."""

    def __init__(self, message: str, unsafe: bool = False):
        super().__init__(message)
        self.unsafe = unsafe


def folder(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def listed(ckpt_dir: Path) -> list[Path]:
    """Step checkpoints, oldest first."""
    found = [(int(m.group(1)), p) for p in ckpt_dir.glob("ckpt-*.pt") if (m := NAME.search(p.name)) and p.is_file()]
    return [p for _, p in sorted(found)]


CHUNK = 1 << 20  # bytes written between two counts of progress (a slow disk is not a hang)


def atomic_save(obj: Any, path: Path) -> None:
    """Write to a temporary file beside `path`, fsync, then rename over it: never a partial file."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getbuffer()
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            for start in range(0, len(data), CHUNK):
                fh.write(data[start:start + CHUNK])
                made_progress()
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as err:
        raise WriteFailed(path, err) from None
    finally:
        tmp.unlink(missing_ok=True)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # makes the rename itself durable
    finally:
        os.close(fd)


def save(state: dict, ckpt_dir: Path, keep_last: int, is_best: bool) -> Path:
    """Save `state` as ckpt-<step>.pt, point best.pt at it if best, keep only the last `keep_last`."""
    path = ckpt_dir / f"ckpt-{state['step']:08d}.pt"
    try:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        atomic_save(state, path)
        if is_best:
            link = ckpt_dir / f".best.pt.tmp{os.getpid()}"
            link.unlink(missing_ok=True)
            os.link(path, link)  # same inode: costs nothing and survives pruning of the step file
            os.replace(link, ckpt_dir / "best.pt")
        for old in listed(ckpt_dir)[:-keep_last]:
            old.unlink(missing_ok=True)
    except OSError as err:
        raise WriteFailed(ckpt_dir / "best.pt" if path.exists() else path, err) from None
    return path


def load(path: str | os.PathLike) -> dict:
    """Load a checkpoint safely: weights_only refuses any pickled callable before it can run.

    Always onto the CPU, whatever device saved it or will train on: the RNG states must be CPU tensors
    (torch.set_rng_state refuses others), and no GPU error (out of memory, a busy or missing device)
    can happen here and be mistaken for a corrupt file. `load_state_dict` copies onto the device."""
    path = Path(path)
    try:
        with warnings.catch_warnings():  # torch warns about odd pickle protocols before failing anyway
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except pickle.UnpicklingError as err:
        if "GLOBAL" in str(err):  # a reference to a class or function: code, refused before it runs
            raise CheckpointError(
                f"checkpoint {path} refused: it carries pickled code or objects, not just tensors "
                f"and numbers (nothing in it was run)", unsafe=True) from None
        raise CheckpointError(f"checkpoint {path} is corrupt ({first_line(err)})") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as err:
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({first_line(err)})") from None
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED):
        raise CheckpointError(f"checkpoint {path} is not an mnist-dist checkpoint (keys missing)")
    if state["format_version"] != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format {state['format_version']}, this version reads {FORMAT_VERSION}")
    return state


def first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]


def newest_valid(ckpt_dir: Path) -> tuple[dict, Path] | None:
    """The newest checkpoint that loads; corrupt ones are reported and skipped, unsafe ones refused."""
    for path in reversed(listed(ckpt_dir)):
        try:
            return load(path), path
        except CheckpointError as err:
            if err.unsafe:
                raise
            print(f"mnist-dist: warning: skipping {err}", file=sys.stderr, flush=True)
    return None


def restore(state: dict, model: torch.nn.Module, opt: torch.optim.Optimizer, device: torch.device) -> None:
    """Put a loaded checkpoint (CPU tensors) into the model and optimizer, which live on `device`
    (load_state_dict copies there), and restore this rank's random generators."""
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"], device)


# --- random number generator states, as plain tensors and numbers -------------------------------

def rng_state(device: torch.device) -> dict:
    """This process's generators. Every rank seeds and draws alike, so rank 0's states (which the
    checkpoint saves) are every rank's; on a GPU that is the generator of this rank's own device, not
    of every device the process can see (another job may see more or fewer of them)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    try:
        import numpy as np
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        state["numpy"] = {"keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
                          "has_gauss": int(has_gauss), "gauss": float(gauss)}
    except ImportError:
        pass
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    """Restore the states saved by `rng_state` (CPU tensors, as `load` returns them) on this rank."""
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
    if "numpy" in state:
        import numpy as np
        n = state["numpy"]
        np.random.set_state(("MT19937", n["keys"].numpy().astype("uint32"), n["pos"], n["has_gauss"], n["gauss"]))


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as err:
        raise WriteFailed(path, err) from None
    finally:
        tmp.unlink(missing_ok=True)
