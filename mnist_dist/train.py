"""Train the MNIST classifier with DistributedDataParallel.

    torchrun --nproc_per_node=2 -m mnist_dist.train --data-dir DIR --epochs 3
    python -m mnist_dist.train --data-dir DIR        # one process, the same code path
    mnist-dist train --data-dir DIR                  # the console script

`train(cfg)` returns the summary dict (also written to RUN_DIR/summary.json). `Trainer.run` is the loop.
"""
from __future__ import annotations

import contextlib
import math
import resource
import socket
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import PROCESS_START, checkpoint, compression, data, distributed, optim, progress, rank_timing, slowdown
from .checkpoint import Checkpointer, EpochTally, TrainState
from .config import Config, parse_config
from .ddp import Exchange, wrap_ddp
from .distributed import DistEnv, Ranks
from .errors import EXIT_OK, Diverged, JobError, Preempted, UsageError, exit_process, print_error, warn
from .evaluate import Evaluation, evaluate
from .exact import ExactStep, one_thread
from .job import Job
from .model import build, check_fits
from .profiling import StepProfiler
from .rank_timing import RankTiming
from .signals import StopFlag
from .slowdown import Interval, SlowdownWatch
from .tracking import NullTracker


def train(cfg: Config, env: DistEnv | None = None) -> dict:
    """Join the process group, train, evaluate on rank 0, and leave the group again."""
    job = Job(cfg, env or distributed.read_env())
    with job.running():
        ranks = job.start()
        with StopFlag() as stop:
            job.summary = Trainer(cfg, job.env, ranks, job.tracker, stop).run()
        job.tracker.write_summary(job.summary)
    return job.summary


class Trainer:
    """The training loop of one rank. Every rank runs the same steps and collectives; rank 0's
    tracker and checkpointer write, the others' do nothing."""

    def __init__(self, cfg: Config, env: DistEnv, ranks: Ranks, tracker: NullTracker, stop: StopFlag):
        self.cfg, self.env, self.ranks, self.tracker, self.stop = cfg, env, ranks, tracker, stop
        self.device, W = ranks.device, env.world_size
        # data checks (local rank 0 checks and downloads while the others wait), then the resume point:
        # rank 0 reads the checkpoint and every rank takes the state from it, so all resume at one step
        progress.enter("data load")
        ranks.check(data.fetch, cfg.data_dir, cfg.download, cfg.verify_data, on="local_main")
        ckpt = ranks.from_newest(checkpoint.resume_point, cfg)
        self.main_host = ranks.from_main(socket.gethostname)  # where rank 0 writes the checkpoints
        self.warn_if_progress_lost(ckpt["step"] if ckpt else 0)
        self.state = TrainState.from_checkpoint(ckpt) if ckpt else TrainState()
        # rank 0's W&B process starts the run (the id is in the checkpoint) while this one loads the data
        self.state.wandb_run_id = tracker.start(cfg, self.state.metrics, self.state.wandb_run_id)
        self.train_x, self.train_y = ranks.check(data.load, cfg.data_dir, train=True, device=self.device)
        self.test = ranks.check(data.load, cfg.data_dir, train=False, device=self.device, on="main")
        self.model, self.opt = self.build_model()
        self.compression = compression.make(cfg, self.model, self.device, W)
        self.ckpt = Checkpointer(cfg, enabled=env.is_main)
        self.start_from(ckpt)
        # each rank's compute and wait per interval: the exchange is timed, the rest is compute
        self.timing = RankTiming.wanted(cfg.straggler_factor > 0, self.device, W, env.rank)
        if cfg.exact:  # no DDP: ExactStep makes the gradients, the same bits for any world size
            self.ddp, self.exact = self.model, ExactStep(self.model, cfg, env, self.device)
            self.exchange: Exchange = self.exact.exchange_info
            if self.exact.exchange:
                self.exact.exchange = self.timing.timed(self.exact.exchange, self.exact.shared)
        else:
            self.ddp, self.exchange = wrap_ddp(self.model, self.device, env, cfg, self.compression, self.timing.hook)
            self.exact = None
        self.averages_gradients = W > 1  # read every step: the one check there
        tracker.say(f"{W} rank{'s' if W > 1 else ''} on {self.device.type}; {self.exchange.how}")
        self.slowdown = self.watch_slowdown()
        self.per_rank, self.log_every = cfg.batch_size // W, cfg.log_every
        # DistributedSampler pads the data to a multiple of the world size; --exact to whole global batches
        n = len(self.train_y)
        self.steps_per_epoch = (
            math.ceil(n / cfg.batch_size) if cfg.exact else math.ceil(math.ceil(n / W) / self.per_rank)
        )
        self.pending: list[tuple[torch.Tensor, ...]] = []  # (loss, logits, labels) of each step since the last sync
        self.last_eval = None
        self.train_seconds = self.epoch_seconds = 0.0
        self.epoch_samples = 0  # trained in this process's part of the epoch (a resumed epoch's rest)
        self.fit_start = self.t_sync = time.perf_counter()
        self.start_step = self.state.step
        self.profiler = StepProfiler.wanted(cfg, env, self.steps_per_epoch * cfg.epochs, self.device, tracker.say)

    def run(self) -> dict:
        """Train to the last epoch (from where the checkpoint left off) and return the summary."""
        state = self.state
        while state.epoch < self.cfg.epochs:
            order = self.start_epoch()
            while state.batch_in_epoch < self.steps_per_epoch:
                self.train_step(order)
                if self.sync_due():
                    stopping = self.sync()
                    if self.ckpt.should_save(state.step, stopping, self.epoch_over):
                        path = self.save()
                        if stopping:
                            raise Preempted(self.stop.signum, state.step, str(path))
                    self.restart_clock()  # checkpointing and logging are not training time
            self.end_epoch()
        return self.summary()

    # --- set-up -------------------------------------------------------------------------------------
    def build_model(self) -> tuple[torch.nn.Module, torch.optim.Adam]:
        cfg = self.cfg
        self.ranks.check(check_fits, cfg.model, cfg.hidden, self.device)
        torch.manual_seed(cfg.seed)
        model = build(cfg.model, cfg.hidden).to(self.device)
        return model, optim.make_adam(model, cfg.lr)

    def watch_slowdown(self) -> SlowdownWatch:
        """Who judges the per-rank figures, with the hosts (logged once per run, where they changed) and
        the link the exchange travels (none to judge for CPU ranks on one host: waiting there is the
        scheduler's doing)."""
        hosts = rank_timing.gather_hosts(self.env.world_size, self.device)
        if not any(r.get("hosts") == hosts for r in self.state.metrics):
            self.tracker.log({"step": self.state.step, "hosts": hosts})
        link = slowdown.link(self.device.type, hosts, through_shared_memory=self.exchange.shared_memory)
        return SlowdownWatch(self.cfg.straggler_factor, hosts, link, bytes_at=self.exchange.at,
                             compressed=self.cfg.grad_compression != "none")

    def warn_if_progress_lost(self, resumed: int) -> None:
        """Every node's first rank notes each checkpoint rank 0 saves (step and host) in its own run dir.
        A resume point older than a noted one means the node that holds the newer checkpoint is no
        longer in the job (node-local run dirs, an elastic change): say so, and go on from what is here."""
        noted = self.ranks.check(checkpoint.noted_save, self.cfg.run_dir, on="local_main") or (0, "")
        newest = int(self.ranks.max([float(noted[0])], "the newest noted checkpoint")[0])
        if newest > resumed and noted[0] == newest:
            warn(f"this job saved a checkpoint at step {newest} on {noted[1]}, but no node here holds one that new "
                 f"(a node that left the job, node-local run dirs): training goes on from step {resumed}")

    def start_from(self, ckpt: dict | None) -> None:
        """Restore the checkpoint to resume from, or start afresh."""
        if ckpt is None:
            if self.cfg.resume == "never":
                self.ckpt.clear()  # resume_point refused this unless --overwrite was given
            return
        checkpoint.restore(ckpt, self.model, self.opt, self.device)
        s = self.state
        if self.compression.stateful:  # a broken state on any rank ends every rank, in one line
            self.ranks.check(self.compression.restore, ckpt.get("compression"), self.env.world_size, self.env.rank,
                             s.step)
        self.tracker.say(f"resuming at epoch {s.epoch + 1}, batch {s.batch_in_epoch} (step {s.step}), saved with "
                         f"world size {ckpt['world_size']}, now {self.env.world_size}")

    # --- one epoch ----------------------------------------------------------------------------------
    def start_epoch(self) -> torch.Tensor:
        """This rank's sample order for the epoch; the epoch's learning rate."""
        cfg, epoch = self.cfg, self.state.epoch
        n, rank, W = len(self.train_y), self.env.rank, self.env.world_size
        order = (data.exact_epoch_indices(n, rank, W, cfg.seed, epoch, cfg.batch_size, self.device) if cfg.exact
                 else data.epoch_indices(n, rank, W, cfg.seed, epoch, self.device))
        for group in self.opt.param_groups:  # derived from the epoch, so a resumed run gets the same value
            group["lr"] = cfg.lr * cfg.lr_decay ** epoch
        self.epoch_seconds, self.epoch_samples = 0.0, 0
        self.restart_clock()
        self.tracker.start_epoch(epoch + 1, cfg.epochs, self.steps_per_epoch, self.state.batch_in_epoch, cfg.batch_size)
        progress.enter("training step")
        return order

    def restart_clock(self) -> None:
        """The interval's training time starts now (on the GPU's stream too: rank_timing)."""
        self.t_sync = time.perf_counter()
        self.timing.begin()

    def train_step(self, order: torch.Tensor) -> None:
        """One global batch: forward, backward (DDP averages the gradients; or ExactStep), Adam. No host sync."""
        s, n = self.state, self.per_rank
        if self.profiler:
            self.profiler.before(s.step + 1)
        idx = order[s.batch_in_epoch * n:(s.batch_in_epoch + 1) * n]
        x, y = self.train_x.index_select(0, idx), self.train_y.index_select(0, idx)
        if self.exact:
            loss, logits = self.exact(x, y, s.step)  # the global batch's loss and gradients
        else:
            logits = self.ddp(x)
            loss = F.cross_entropy(logits, y)
            if self.averages_gradients:
                progress.entering("DDP's gradient averaging, in backward")
            loss.backward()
            self.timing.after_backward()
        optim.step(self.opt)  # and clears the gradients
        self.pending.append((loss.detach(), logits.detach(), y))
        s.batch_in_epoch, s.step = s.batch_in_epoch + 1, s.step + 1
        progress.made(s.step)  # what the hang watchdog watches
        self.tracker.stepped(s.batch_in_epoch)
        if self.profiler:
            self.profiler.after(s.step)

    @property
    def epoch_over(self) -> bool:
        return self.state.batch_in_epoch == self.steps_per_epoch

    def sync_due(self) -> bool:
        return len(self.pending) >= self.log_every or self.epoch_over or self.ckpt.due(self.state.step)

    def sync(self) -> bool:
        """The sync point: one all_reduce carries the interval's losses, right answers, stop flags and
        every rank's compute and wait seconds. Logs the interval, says when a rank or the link is slow;
        returns whether any rank got a stop signal."""
        progress.enter("sync point")
        losses, logits, labels = zip(*self.pending, strict=True)
        labels = torch.cat(labels)
        samples, steps = len(labels) * self.env.world_size, len(losses)
        right = (torch.cat(logits).argmax(1) == labels).sum().float()
        signum = torch.tensor([float(self.stop.signum)], device=self.device)
        times = self.timing.slots(time.perf_counter() - self.t_sync)  # this rank's, in its own slots
        losses = torch.stack(losses)  # each rank's mean loss of its equal share; --exact's: the global batch's
        packet = torch.cat([right.view(1), signum, times] + ([] if self.exact else [losses]))
        progress.entering("all_reduce of the sync point (losses, right answers, stop flags, per-rank times)")
        dist.all_reduce(packet)
        n_correct, stopping, *summed = packet.tolist()  # host-device sync point
        times, summed = summed[:len(times)], summed[len(times):]
        step_losses = losses.tolist() if self.exact else [v / self.env.world_size for v in summed]
        self.check_finite(step_losses)
        now = time.perf_counter()
        s = self.state
        interval = Interval(steps, *rank_timing.split(times, self.env.world_size))  # empty with --straggler-factor 0
        self.tracker.log({"step": s.step, "epoch": s.epoch + 1, "train_loss": sum(step_losses) / len(step_losses),
                          "lr": self.opt.param_groups[0]["lr"], "samples_per_s": samples / (now - self.t_sync),
                          **interval.as_record()})
        for event in self.slowdown.judge(s.step, s.epoch + 1, interval):
            self.tracker.event(event.record, event.line, event.level)
        self.state.epoch_tally.add(step_losses, n_correct, samples)
        self.pending.clear()
        self.epoch_seconds += now - self.t_sync
        self.epoch_samples += samples
        progress.enter("training step")
        return stopping > 0

    def check_finite(self, step_losses: list[float]) -> None:
        bad = next((i for i, v in enumerate(step_losses) if not math.isfinite(v)), None)
        if bad is not None:
            step = self.state.step - len(step_losses) + bad + 1
            raise Diverged(f"loss became {step_losses[bad]} at step {step} (epoch {self.state.epoch + 1}); "
                           f"the newest checkpoint in {self.ckpt.dir} is from before it")

    def save(self, is_best: bool = False) -> Path:
        phase = progress.phase
        progress.enter("checkpoint write")
        # every rank's compression state, gathered by every rank (one collective)
        extra = self.compression.checkpoint(self.env.world_size, self.device) if self.compression.stateful else None
        path = self.ckpt.save(lambda: checkpoint.snapshot(self.state, self.model, self.opt, self.cfg,
                                                          self.env.world_size, self.device, extra), is_best)
        if self.env.is_local_main:
            checkpoint.note_save(self.cfg.run_dir, self.state.step, self.main_host)
        progress.enter(phase)
        return path

    # --- the epoch's end ----------------------------------------------------------------------------
    def end_epoch(self) -> None:
        """Rank 0 evaluates the unwrapped model while the others wait for its numbers; the epoch's record,
        checkpoint and line. A stop signal that came during the epoch's last steps stops the run here."""
        s, tally = self.state, self.state.epoch_tally
        self.tracker.end_epoch()
        self.train_seconds += self.epoch_seconds
        progress.enter("evaluation")
        t_eval = time.perf_counter()
        self.last_eval = self.evaluate() if self.env.is_main else None
        eval_seconds = time.perf_counter() - t_eval
        _, test_acc = self.shared_eval()
        progress.enter("epoch end")
        s.epoch, s.batch_in_epoch, s.epoch_tally = s.epoch + 1, 0, EpochTally()
        self.tracker.log({"step": s.step, "epoch": s.epoch, "train_loss_epoch": tally.mean_loss,
                          "elapsed_s": time.time() - PROCESS_START, "epoch_train_s": self.epoch_seconds,
                          "eval_s": eval_seconds, "train_acc": tally.accuracy,
                          **(self.last_eval.as_record() if self.last_eval else {})})
        self.tracker.figures(s.step, self.last_eval, self.test)
        is_best, s.best_acc = test_acc > s.best_acc, max(s.best_acc, test_acc)
        path = self.save(is_best)
        self.tracker.say(self.epoch_line(tally, test_acc))
        if self.ranks.sum([float(self.stop.signum)], "the stop flags")[0] > 0 and s.epoch < self.cfg.epochs:
            raise Preempted(self.stop.signum, s.step, str(path))

    def evaluate(self) -> Evaluation:
        """Rank 0's evaluation of the unwrapped model; under --exact on one thread, so that the test loss
        has the same bits whatever the launcher's thread count."""
        with one_thread() if self.exact else contextlib.nullcontext():
            return evaluate(self.model, *self.test)

    def shared_eval(self) -> list[float]:
        """Rank 0's test loss and accuracy on every rank (the others wait here while rank 0 evaluates)."""
        return self.ranks.main_values([self.last_eval.loss, self.last_eval.acc] if self.last_eval else [0.0, 0.0],
                                      "rank 0's test loss and accuracy")

    def epoch_line(self, tally: EpochTally, test_acc: float) -> str:
        cfg, s = self.cfg, self.state
        elapsed = time.perf_counter() - self.fit_start
        eta = elapsed / max(s.step - self.start_step, 1) * (cfg.epochs * self.steps_per_epoch - s.step)
        return (f"epoch {s.epoch}/{cfg.epochs}  train_loss {tally.mean_loss:.4f}  train_acc {tally.accuracy:.2%}  "
                f"test_acc {test_acc:.2%}  {self.epoch_samples / max(self.epoch_seconds, 1e-9):,.0f} samples/s  "
                f"elapsed {elapsed:.1f}s  eta {eta:.1f}s")

    def summary(self) -> dict:
        progress.enter("evaluation")
        if self.last_eval is None and self.env.is_main:  # resumed a finished run: evaluate what it saved
            self.last_eval = self.evaluate()
        test_loss, test_acc = self.shared_eval()
        ev, cfg = self.last_eval, self.cfg
        return {
            "test_acc": test_acc, "test_loss": test_loss, "per_class_acc": ev.per_class_acc if ev else None,
            "best_test_acc": max(self.state.best_acc, test_acc), "epochs": cfg.epochs, "steps": self.state.step,
            "world_size": self.env.world_size, "global_batch_size": cfg.batch_size, "model": cfg.model,
            "test_images": int(ev.confusion.sum()) if ev else None,
            "train_seconds": self.train_seconds, "total_seconds": time.time() - PROCESS_START,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "device": str(self.device), "run_dir": str(cfg.run_dir), "exact": cfg.exact,
            "fingerprint": checkpoint.fingerprint(self.model.state_dict()),
        }


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m mnist_dist.train` and `mnist-dist train`: returns the exit code."""
    env = distributed.read_env()
    try:
        cfg = parse_config(argv)
    except UsageError as err:  # every rank parsed the same flags: each node's first rank says what is wrong
        if env.is_local_main:
            print_error(err)
        return err.exit_code
    try:
        summary = train(cfg, env)
    except JobError as err:  # said where it happened (Job.running)
        return err.exit_code
    if env.is_main:
        print(f"test accuracy {summary['test_acc']:.2%}, weights' fingerprint {summary['fingerprint']}, summary in "
              f"{Path(summary['run_dir']) / 'summary.json'}", flush=True)
    return EXIT_OK


if __name__ == "__main__":
    exit_process(main())
