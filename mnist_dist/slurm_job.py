"""The submitit callable: compute nodes import it from the package, so it runs wherever mnist-dist is
installed. Used by launch/submit.py and launch/sweep.py.

Each Slurm task is one rank: submitit's TorchDistributedEnvironment exports RANK, LOCAL_RANK,
WORLD_SIZE, MASTER_ADDR and MASTER_PORT, then the ordinary `train` runs. On USR2 (preemption or the
time limit) the training loop checkpoints first; then submitit's own handler asks `checkpoint()` for
the resubmission, requeues the job, and the requeued job resumes from the run dir.
"""
from __future__ import annotations

import os
import signal

from .config import parse_config
from .errors import Preempted


class DoctorJob:
    """`mnist-dist doctor` on every task of the job, with the training flags' data dir, run dir and device."""

    def __init__(self, argv: list[str]):
        self.argv = list(argv)

    def __call__(self) -> dict:
        import submitit

        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        from . import doctor

        cfg = parse_config(self.argv)
        argv = ["--data-dir", cfg.data_dir, "--run-dir", cfg.run_dir, "--device", cfg.device,
                *([] if cfg.verify_data else ["--no-verify-data"])]
        code = doctor.main(argv)
        return {"doctor_exit_code": code}


class TrainJob:
    def __init__(self, argv: list[str]):
        self.argv = list(argv)

    def __call__(self) -> dict | None:
        import submitit

        dist_env = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        os.environ["MNIST_STOP_SIGNALS"] = "USR2"  # submitit's preemption signal; it bypasses SIGTERM itself
        from .train import train

        try:
            return train(parse_config(self.argv))
        except Preempted as stopped:
            # the checkpoint is on disk: hand over to submitit's handler for this signal, which calls
            # checkpoint() below and requeues the job (global rank 0; it exits), or returns (other ranks)
            handler = signal.getsignal(stopped.signum)
            if callable(handler):
                # Slurm SIGTERMs every process of the job as it requeues it, the `scontrol requeue`
                # that submitit's handler runs included: ignored here, and so in that child, the
                # requeue always completes and is reported (else submitit records a failure)
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                handler(stopped.signum, None)
            if dist_env.rank == 0:
                raise
            return None

    def checkpoint(self, *args, **kwargs):
        """Called by submitit on preemption/timeout: the same job again; it resumes from the run dir."""
        import submitit

        return submitit.helpers.DelayedSubmission(TrainJob(self.argv))
