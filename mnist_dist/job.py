"""This rank's part of a training job: the process group, the hang watchdog, the run-dir lock and the
tracker, and the one failure policy (`Job.running`). Used by `train.train`.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch.distributed as dist

from . import container, devices, distributed, run_dir
from .checkpoint import checkpoint_dir, resume_hint
from .config import Config
from .distributed import DistEnv, Ranks
from .errors import EXIT_ERROR, JobError, PeerStopped, WriteFailed, first_line, print_error, say, warn
from .tracking import NullTracker, make_tracker
from .watchdog import Failure, Watchdog


class Job:
    """What this rank holds while it trains, let go of in order however the run ends."""

    def __init__(self, cfg: Config, env: DistEnv):
        self.cfg, self.env = cfg, env
        self.device = devices.pick_device(cfg.device, env.local_rank)
        self.watch: Watchdog | None = None
        self.tracker: NullTracker = NullTracker()
        self.lock: int | None = None
        self.summary: dict | None = None  # set when training got to its end on this rank

    def start(self) -> Ranks:
        """Join the process group, start the watchdog and the tracker, check every rank's flags against
        rank 0's, claim the run dir."""
        cfg, env = self.cfg, self.env
        if env.is_local_main and (line := container.pid1_warning()):
            warn(line)
        timeout = distributed.collective_timeout(cfg.start_timeout, cfg.hang_timeout)
        store = distributed.connect(env, timeout, cfg.start_timeout)
        # from here on, a failure reaches every rank
        self.watch = Watchdog(env, cfg.hang_timeout, cfg.run_dir, start_timeout=cfg.start_timeout)
        distributed.init(env, store, self.device, timeout)
        self.watch.formed()
        self.tracker = make_tracker(env.is_main, cfg)
        ranks = Ranks(env, self.device)
        ranks.check(check_flags, cfg, ranks.from_main(cfg.to_dict), env)
        self.lock = ranks.check(run_dir.claim, cfg, env, on="main")
        devices.make_deterministic(self.device, cfg.deterministic)
        return ranks

    @contextlib.contextmanager
    def running(self) -> Iterator[Job]:
        """The failure policy, for every error that leaves training:
        - raised by every rank at the same point (a failed check, a NaN loss, a stop signal: decided in a
          collective): each node's first rank says it, and every rank waits until it is said (a launcher kills the
          others as soon as one exits);
        - raised on this rank alone: posted for the others, whose watchdogs stop them at once; unless it
          only echoes another rank's failure or a lost peer, and then it becomes PeerStopped.
        Either way one line says it, on the rank that knows it, and what the run holds is let go of."""
        try:
            yield self
        except Exception as err:
            instead = self.settle(err)
            if instead is not None:
                raise instead from None
            raise
        finally:
            self.release()

    def settle(self, err: Exception) -> PeerStopped | None:
        """Say `err` and tell the others; returns the error to raise instead of it, if any."""
        if isinstance(err, JobError) and err.everywhere:
            if self.env.is_local_main:  # one line in each node's log
                say(err)
            if self.watch:
                self.watch.stop()  # the wait below is no hang
            if dist.is_initialized():
                dist.barrier()
            return None
        stopped = (self.watch and self.watch.failed_elsewhere()) or self.lost_peer(err)
        if stopped:
            print_error(stopped)
            return stopped
        reason = explain(err, self.cfg)
        if self.watch:
            self.watch.abort(Failure(getattr(err, "exit_code", EXIT_ERROR), self.env.rank,
                                     f"{type(err).__name__}: {reason}"[:300]))
        if isinstance(err, JobError):
            print_error(reason)
        return None

    def lost_peer(self, err: Exception) -> PeerStopped | None:
        """A peer that vanished (kill -9, a lost node) shows as a broken connection on this rank."""
        if self.env.world_size > 1 and isinstance(err, (ConnectionError, dist.DistError)):
            return PeerStopped(f"rank {self.env.rank} stops: it lost contact with another rank ({first_line(err)}); "
                               f"torchrun --max-restarts, or running the job again, resumes from the newest checkpoint")
        return None

    def release(self) -> None:
        """The watchdog stops, the tracker closes (W&B finishes on every exit), the run dir is unlocked
        and the process group left: after a complete run, once every rank got there."""
        if self.watch:
            self.watch.stop()
        try:
            self.tracker.close()
        finally:
            run_dir.release(self.lock)
            distributed.shutdown(clean=self.summary is not None)


def check_flags(cfg: Config, main_cfg: dict, env: DistEnv) -> None:
    cfg.validate(env.world_size)
    devices.check_device(cfg.device)
    cfg.check_same_as(main_cfg, env.rank)


def explain(err: Exception, cfg: Config) -> str:
    """The one line for an error on this rank alone; a failed write also names the checkpoint to resume from."""
    if isinstance(err, WriteFailed):
        return f"{err}; {resume_hint(checkpoint_dir(cfg.run_dir))}"
    return first_line(err)
