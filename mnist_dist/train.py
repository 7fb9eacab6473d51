"""Train the MNIST classifier with DistributedDataParallel.

    torchrun --nproc_per_node=2 -m mnist_dist.train --data-dir DIR --epochs 3
    python -m mnist_dist.train --data-dir DIR        # one process, the same code path
    mnist-dist train --data-dir DIR                  # the console script

`train(cfg)` returns the summary dict (also written to RUN_DIR/summary.json).
"""
from __future__ import annotations

import math
import resource
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import PROCESS_START, checkpoint, data, distributed, optim, run_dir
from .config import Config, UsageError, parse_config, print_error
from .distributed import DistEnv, agree
from .evaluate import Evaluation, evaluate
from .host_allreduce import PeerGone
from .model import build, check_fits
from .preempt import EXIT_ERROR, EXIT_OK, Diverged, Preempted, StopFlag
from .tracking import NullTracker, make_tracker
from .watchdog import PeerFailure, Watchdog, made_progress


def train(cfg: Config, env: DistEnv | None = None) -> dict:
    """Join the process group, train, evaluate on rank 0, and leave the group again."""
    env = env or distributed.read_env()
    device = distributed.pick_device(cfg.device, env.local_rank)
    distributed.init(env, device, cfg.hang_timeout)
    watch = Watchdog(env, cfg.hang_timeout)
    tracker = make_tracker(env.is_main, cfg)
    summary, lock = None, None
    try:
        main_cfg = distributed.broadcast_object(cfg.to_dict(), env.is_main, device)
        agree(lambda: (cfg.validate(env.world_size), distributed.check_device(cfg.device),
                       cfg.check_same_as(main_cfg, env.rank)), True, env.is_main, device)
        lock = agree(lambda: run_dir.claim(cfg, env), env.is_main, env.is_main, device)
        distributed.make_deterministic(device, cfg.deterministic)
        with StopFlag() as stop:
            summary = fit(cfg, env, device, tracker, stop)
        return summary
    except (UsageError, Diverged, Preempted) as err:  # raised by every rank at the same point
        if env.is_main and not isinstance(err, distributed.PeerFailed):
            announce(err)
        err.reported = True
        # a launcher kills the other ranks as soon as one exits: none leaves before rank 0 said why
        watch.stop()
        torch.distributed.barrier()
        raise
    except Exception as err:  # this rank alone: the others must not wait for it in a collective
        elsewhere = watch.failed_elsewhere()
        if elsewhere:  # a peer failed first (and said why): this error is only the echo of it
            raise elsewhere from None
        if env.world_size > 1 and isinstance(err, (PeerGone, torch.distributed.DistError)):  # a peer vanished
            raise PeerFailure(f"rank {env.rank} stops: it lost contact with another rank ({str(err).splitlines()[0][:300]}); "
                              f"torchrun --max-restarts, or running the job again, resumes from the newest checkpoint") from None
        if isinstance(err, checkpoint.WriteFailed):
            err.newest = checkpoint.newest_note(checkpoint.folder(cfg.run_dir))
        watch.abort(f"{type(err).__name__}: {err}".splitlines()[0][:300], getattr(err, "exit_code", EXIT_ERROR))
        raise
    finally:
        watch.stop()
        try:
            tracker.finish(summary, checkpoint.folder(cfg.run_dir) / "best.pt")  # W&B finishes on every exit
        finally:
            run_dir.release(lock)
            distributed.shutdown(clean=summary is not None)


class Checkpointer:
    """Rank 0 writes checkpoints; on other ranks every call does nothing."""

    def __init__(self, cfg: Config, enabled: bool):
        self.dir, self.keep_last, self.enabled = checkpoint.folder(cfg.run_dir), cfg.keep_last, enabled
        self.best_acc = -1.0

    def clear(self) -> None:
        if not self.enabled:
            return
        for path in (*checkpoint.listed(self.dir), self.dir / "best.pt"):
            path.unlink(missing_ok=True)

    def save(self, make_state, test_acc: float | None = None) -> Path:
        path = self.dir / "(rank 0 only)"
        is_best = test_acc is not None and test_acc > self.best_acc
        if self.enabled:
            path = checkpoint.save(make_state(), self.dir, self.keep_last, is_best)
        self.best_acc = max(self.best_acc, test_acc if test_acc is not None else -1.0)
        return path


def shared_eval(result: Evaluation | None, device: torch.device) -> list[float]:
    """Rank 0's test loss and accuracy on every rank (the others wait here while rank 0 evaluates)."""
    return distributed.broadcast_from_main([result.loss, result.acc] if result else [0.0, 0.0], device)


def fit(cfg: Config, env: DistEnv, device: torch.device, tracker: NullTracker, stop: StopFlag) -> dict:
    W = env.world_size

    # --- data checks (local rank 0 checks and downloads while the others wait), the resume point ---
    agree(lambda: data.fetch(cfg.data_dir, cfg.download, cfg.verify_data), env.is_local_main, env.is_main, device)
    # rank 0 reads the checkpoint and every rank takes the state from it: all resume at one step
    state = distributed.broadcast_object(agree(lambda: run_dir.resume_state(cfg), env.is_main, env.is_main, device),
                                         env.is_main, device)
    # rank 0's W&B process starts the run (the id is in the checkpoint) while this one loads the data
    tracker.start(cfg, state["metrics"] if state else [], state.get("wandb_run_id") if state else None)
    train_x, train_y = agree(lambda: data.load(cfg.data_dir, train=True, device=device), True, env.is_main, device)
    test_x, test_y = agree(lambda: data.load(cfg.data_dir, train=False, device=device), env.is_main, env.is_main,
                           device) or (None, None)

    # --- model and optimizer, as of the resume point ---------------------------------------------
    agree(lambda: check_fits(cfg.model, cfg.hidden, device), True, env.is_main, device)
    torch.manual_seed(cfg.seed)
    model = build(cfg.model, cfg.hidden).to(device)
    opt = optim.make_adam(model, cfg.lr)
    ckpt = Checkpointer(cfg, enabled=env.is_main)
    epoch, batch, step = 0, 0, 0
    tally = [0.0, 0, 0.0, 0]  # this epoch so far, over all ranks: loss sum, steps, right answers, samples
    if state is None:
        if cfg.resume == "never":
            ckpt.clear()  # run_dir.resume_state refused this unless --overwrite was given
    else:
        checkpoint.restore(state, model, opt, device)
        epoch, batch, step, ckpt.best_acc = state["epoch"], state["batch_in_epoch"], state["step"], state["best_acc"]
        tally = list(state["epoch_tally"])
        tracker.say(f"resuming at epoch {epoch + 1}, batch {batch} (step {step}), saved with world size "
                    f"{state['world_size']}, now {W}")
    ddp, averaging = distributed.wrap_ddp(model, device, env, cfg.cpu_allreduce)
    tracker.say(f"{W} rank{'s' if W > 1 else ''} on {device.type}; {averaging}")

    def make_state() -> dict:
        return {
            "format_version": checkpoint.FORMAT_VERSION, "model": model.state_dict(),
            "optimizer": opt.state_dict(), "epoch": epoch, "batch_in_epoch": batch, "step": step,
            "rng": checkpoint.rng_state(device), "config": cfg.to_dict(), "world_size": W,
            "metrics": list(getattr(tracker, "history", [])), "best_acc": ckpt.best_acc,
            "wandb_run_id": tracker.wandb_run_id, "epoch_tally": list(tally),
        }

    # --- the loop ---------------------------------------------------------------------------------
    n, per_rank = len(train_y), cfg.batch_size // W
    steps_per_epoch = math.ceil(math.ceil(n / W) / per_rank)  # DistributedSampler pads n to a multiple of W
    pending = []  # (loss, logits, labels) of each step since the last sync, left on the device
    train_seconds, last_eval, fit_start, start_step = 0.0, None, time.perf_counter(), step
    while epoch < cfg.epochs:
        order = data.epoch_indices(n, env.rank, W, cfg.seed, epoch, device)
        for group in opt.param_groups:  # derived from the epoch, so a resumed run gets the same value
            group["lr"] = cfg.lr * cfg.lr_decay ** epoch
        epoch_seconds, t_sync = 0.0, time.perf_counter()
        while batch < steps_per_epoch:
            idx = order[batch * per_rank:(batch + 1) * per_rank]
            x, y = train_x.index_select(0, idx), train_y.index_select(0, idx)
            logits = ddp(x)
            loss = F.cross_entropy(logits, y)
            loss.backward()  # DDP averages the gradients over all ranks here
            optim.step(opt)  # and clears the gradients
            pending.append((loss.detach(), logits.detach(), y))  # no host sync per step
            batch, step = batch + 1, step + 1
            made_progress(step)  # what the hang watchdog watches
            save_now = cfg.ckpt_every > 0 and step % cfg.ckpt_every == 0
            if len(pending) < cfg.log_every and not save_now and batch < steps_per_epoch:
                continue

            # sync point: one all_reduce carries the interval's losses, right answers and stop flags
            step_loss, step_logits, step_labels = zip(*pending)
            k, labels = len(pending), torch.cat(step_labels)
            right = (torch.cat(step_logits).argmax(1) == labels).sum().float()
            packet = torch.cat([torch.stack(step_loss), right.view(1), torch.tensor([float(stop.signum)], device=device)])
            torch.distributed.all_reduce(packet)
            *step_losses, n_correct, stopping = packet.tolist()  # host-device sync point
            step_losses = [v / W for v in step_losses]  # equal per-rank batches: the mean is the global mean
            bad = next((i for i, v in enumerate(step_losses) if not math.isfinite(v)), None)
            if bad is not None:
                raise Diverged(f"loss became {step_losses[bad]} at step {step - k + bad + 1} (epoch {epoch + 1}); "
                               f"the newest checkpoint in {ckpt.dir} is from before it")
            now = time.perf_counter()
            tracker.log({"step": step, "epoch": epoch + 1, "train_loss": sum(step_losses) / k,
                         "lr": opt.param_groups[0]["lr"], "samples_per_s": len(labels) * W / (now - t_sync)})
            tally = [a + b for a, b in zip(tally, (sum(step_losses), k, n_correct, len(labels) * W))]
            pending.clear()
            epoch_seconds += now - t_sync
            if (save_now or stopping) and batch < steps_per_epoch:  # at an epoch end, the code below saves
                path = ckpt.save(make_state)
                if stopping:
                    raise Preempted(stop.signum, step, str(path))
            t_sync = time.perf_counter()  # checkpointing and logging are not training time
        train_seconds += epoch_seconds

        # --- epoch end: rank 0 evaluates the unwrapped model while the others wait for its numbers --
        t_eval = time.perf_counter()
        last_eval = evaluate(model, test_x, test_y) if env.is_main else None
        eval_seconds = time.perf_counter() - t_eval
        test_loss, test_acc = shared_eval(last_eval, device)
        loss_sum, n_steps, n_correct, n_seen = tally
        epoch, batch, tally = epoch + 1, 0, [0.0, 0, 0.0, 0]
        tracker.log({"step": step, "epoch": epoch, "train_loss_epoch": loss_sum / max(n_steps, 1),
                     "elapsed_s": time.time() - PROCESS_START, "epoch_train_s": epoch_seconds, "eval_s": eval_seconds,
                     "train_acc": n_correct / max(n_seen, 1), **(last_eval.as_record() if last_eval else {})})
        tracker.figures(step, {"eval": last_eval, "images": test_x, "labels": test_y})
        path = ckpt.save(make_state, test_acc)
        elapsed = time.perf_counter() - fit_start
        eta = elapsed / max(step - start_step, 1) * (cfg.epochs * steps_per_epoch - step)
        tracker.say(f"epoch {epoch}/{cfg.epochs}  train_loss {loss_sum / max(n_steps, 1):.4f}  "
                    f"train_acc {n_correct / max(n_seen, 1):.2%}  test_acc {test_acc:.2%}  "
                    f"{n_seen / max(epoch_seconds, 1e-9):,.0f} samples/s  elapsed {elapsed:.1f}s  eta {eta:.1f}s")
        if distributed.all_sum([float(stop.signum)], device)[0] > 0 and epoch < cfg.epochs:
            raise Preempted(stop.signum, step, str(path))

    # --- summary ----------------------------------------------------------------------------------
    if last_eval is None and env.is_main:  # resumed a finished run: evaluate what it saved
        last_eval = evaluate(model, test_x, test_y)
    test_loss, test_acc = shared_eval(last_eval, device)
    return {
        "test_acc": test_acc, "test_loss": test_loss,
        "per_class_acc": last_eval.per_class_acc if last_eval else None,
        "best_test_acc": max(ckpt.best_acc, test_acc), "epochs": cfg.epochs, "steps": step,
        "world_size": W, "global_batch_size": cfg.batch_size, "model": cfg.model,
        "test_images": int(last_eval.confusion.sum()) if last_eval else None,
        "train_seconds": train_seconds, "total_seconds": time.time() - PROCESS_START,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "device": str(device), "run_dir": str(cfg.run_dir),
    }


def announce(err: Exception) -> None:
    if isinstance(err, Preempted):
        print(f"mnist-dist: {err}", file=sys.stderr, flush=True)
    else:
        print_error(err)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m mnist_dist.train` and `mnist-dist train`: returns the exit code."""
    env = distributed.read_env()
    try:
        summary = train(parse_config(argv), env)
    except (UsageError, Diverged, Preempted) as err:
        if env.is_main and not getattr(err, "reported", False):
            announce(err)
        return err.exit_code
    except (PeerFailure, checkpoint.WriteFailed) as err:  # one line, on every rank that knows it
        print_error(err)
        return err.exit_code
    if env.is_main:
        print(f"test accuracy {summary['test_acc']:.2%}, summary in {Path(summary['run_dir']) / 'summary.json'}", flush=True)
    return EXIT_OK


if __name__ == "__main__":
    distributed.exit_process(main())
