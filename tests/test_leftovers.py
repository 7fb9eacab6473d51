"""The session-end check of tests/leftovers.py finds what a test left behind: a process started with the
suite's mark (in any process group or session), and a mount; and neither once it is gone. (Other workers'
tests run meanwhile: each test looks for its own leftover only.)"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

import leftovers
from conftest import SESSION


def test_a_marked_process_is_found_until_it_ends():
    before = leftovers.Snapshot()
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        assert os.environ[leftovers.MARK] == SESSION  # what every test's processes inherit
        assert any(line.startswith(f"process {proc.pid}:") for line in leftovers.leftovers(SESSION, before))
    finally:
        proc.kill()
        proc.wait()
    assert not any(f"process {proc.pid}:" in line for line in leftovers.leftovers(SESSION, before))


def test_a_process_without_the_mark_is_not_the_suites():
    before = leftovers.Snapshot()
    env = {k: v for k, v in os.environ.items() if k != leftovers.MARK}
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], env=env)
    try:
        assert not any(f"process {proc.pid}:" in line for line in leftovers.leftovers(SESSION, before))
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_a_mount_left_behind_is_found_until_it_is_unmounted(tmp_path):
    def listed() -> bool:
        return any(line.startswith("mount ") and line.endswith(f" {tmp_path}") for line in
                   leftovers.leftovers(SESSION, before))

    before = leftovers.Snapshot()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(tmp_path)], check=True)
    try:
        assert listed()
    finally:
        subprocess.run(["umount", str(tmp_path)], check=True)
    assert not listed()
