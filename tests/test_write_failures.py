"""Writes that fail mid-run, for real: a run dir on a full file system (a 3 MiB tmpfs)."""
from __future__ import annotations

import subprocess
import warnings

import pytest

from helpers import run_train
from mnist_dist import checkpoint
from mnist_dist.errors import EXIT_WRITE_FAILED


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB file system: two MLP checkpoints (1.2 MB each) fit, the third does not."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if res.returncode != 0:
        warnings.warn(f"FULL-DISK TESTS SKIPPED: cannot mount a tmpfs here ({res.stderr.strip()})", stacklevel=2)
        pytest.skip(f"FULL-DISK TESTS SKIPPED: cannot mount a tmpfs here ({res.stderr.strip()})")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.mark.parametrize("nproc", [1, 2])
def test_a_full_disk_stops_with_one_line_and_keeps_every_checkpoint(medium_data, small_disk, nproc):
    run = small_disk / "run"
    res = run_train(nproc, medium_data, run, "--epochs", "3", "--batch-size", "8", "--ckpt-every", "50")
    code = res.returncode if nproc == 1 else int(res.stderr.split("exitcode  : ")[1].split()[0])
    assert code == EXIT_WRITE_FAILED, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.startswith("mnist-dist: error:")]
    assert len(lines) == nproc, res.stderr  # rank 0's reason, and each other rank's one line
    assert "cannot write " + str(run) in lines[0] and "No space left on device" in lines[0]
    saved = checkpoint.step_checkpoints(run / "checkpoints")
    assert saved and f"the newest good checkpoint is {saved[-1]}" in lines[0], lines[0]
    if nproc == 2:
        assert lines[1].startswith("mnist-dist: error: rank 1 stops: rank 0 failed (WriteFailed: cannot write")
    assert "mnist_dist/" not in res.stderr, "no traceback"
    assert not [p for p in run.rglob("*") if ".tmp" in p.name], "no temporary file is left behind"
    for path in saved:
        assert checkpoint.load(path)["step"] > 0, f"{path} still loads"
