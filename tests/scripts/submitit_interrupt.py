"""Submit a 2-task training job with launch/submit.py's executor, interrupt it as Slurm preempts a job
once it logged step 100 (`job._interrupt()`: SIGTERM, then USR2 to the tasks), and print its test
accuracy when the requeued job has finished.

    python tests/scripts/submitit_interrupt.py SUBMITIT_FOLDER RUN_DIR TRAIN_FLAGS...

Used by tests/test_slurm.py; needs SLURM_CONF pointing at the test cluster.
"""
from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(TESTS.parent / "launch"), str(TESTS)]

import submit  # noqa: E402
from helpers import kick_requeued, metrics, wait_for  # noqa: E402

from mnist_dist.slurm_job import TrainJob  # noqa: E402


def main(folder: str, run_dir: str, *flags: str) -> None:
    args = submit.launcher_parser("").parse_args(["--ntasks-per-node", "2", "--time", "10", "--folder", folder])
    job = submit.make_executor(args).submit(TrainJob([*flags, "--run-dir", run_dir]))
    wait_for(lambda: any(r.get("step", 0) >= 100 for r in metrics(Path(run_dir))), timeout=180, what="step 100")
    job._interrupt()
    done = threading.Event()
    threading.Thread(target=kick_requeued, args=(dict(os.environ), job.job_id, done.is_set), daemon=True).start()
    print(json.dumps(job.results()[0]["test_acc"]))
    done.set()


if __name__ == "__main__":
    main(*sys.argv[1:])
