"""The training loop's pieces in this process (a world-size-1 gloo group): the sync point, when to save,
the training state's round trip through a checkpoint, and the cross-rank check."""
from __future__ import annotations

import json

import pytest
import torch

from mnist_dist import checkpoint
from mnist_dist.checkpoint import Checkpointer, EpochTally, TrainState
from mnist_dist.config import parse_config
from mnist_dist.errors import Diverged, UsageError
from mnist_dist.model import build
from mnist_dist.optim import make_adam
from mnist_dist.signals import StopFlag
from mnist_dist.tracking import Tracker
from mnist_dist.train import Trainer


@pytest.fixture
def trainer(gloo_group, tiny_data, tmp_path):
    """A Trainer on the tiny data, rank 0 of one, writing metrics.jsonl (W&B off)."""
    cfg = parse_config(["--data-dir", str(tiny_data), "--run-dir", str(tmp_path / "run"), "--no-verify-data",
                        "--no-download", "--batch-size", "16", "--log-every", "4", "--wandb", "disabled"])
    tracker = Tracker(cfg)
    with StopFlag() as stop:
        yield Trainer(cfg, gloo_group.env, gloo_group, tracker, stop)
    tracker.close()


def records(trainer) -> list[dict]:
    """The interval and epoch records (not the hosts, logged once at the start)."""
    lines = (trainer.tracker.run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "hosts" not in r]


def test_the_sync_point_logs_the_mean_loss_of_its_steps_and_counts_them_for_the_epoch(trainer):
    order = trainer.start_epoch()
    for _ in range(3):
        trainer.train_step(order)
    losses = [loss.item() for loss, _, _ in trainer.pending]
    assert not trainer.sync(), "no stop signal came"
    [record] = records(trainer)
    assert record["step"] == 3 and record["epoch"] == 1
    assert record["train_loss"] == pytest.approx(sum(losses) / 3, rel=1e-6)
    tally = trainer.state.epoch_tally
    assert (tally.steps, tally.samples) == (3, 48) and 0 <= tally.correct <= 48
    assert trainer.pending == [], "the interval starts afresh"


def test_a_stop_signal_reaches_the_sync_point(trainer):
    order = trainer.start_epoch()
    trainer.train_step(order)
    trainer.stop.signum = 15  # what the SIGTERM handler sets
    assert trainer.sync()


def test_a_nan_loss_stops_at_the_sync_point_naming_the_step(trainer):
    order = trainer.start_epoch()
    trainer.train_step(order)
    trainer.train_step(order)
    trainer.pending[1] = (torch.tensor(float("nan")), *trainer.pending[1][1:])
    with pytest.raises(Diverged, match="loss became nan at step 2 "):
        trainer.sync()


def test_sync_comes_every_log_every_steps_at_checkpoint_steps_and_at_the_epoch_end(trainer):
    order = trainer.start_epoch()
    due = []
    for _ in range(trainer.steps_per_epoch):  # 512 images at 16: 32 steps
        trainer.train_step(order)
        if trainer.sync_due():
            due.append(trainer.state.step)
            trainer.sync()
    assert due == [4, 8, 12, 16, 20, 24, 28, 32]


@pytest.mark.parametrize("step, stopping, epoch_over, save", [
    (100, False, False, True),   # a --ckpt-every step
    (150, False, False, False),
    (150, True, False, True),    # a stop signal: save now
    (200, True, True, False),    # the epoch's end saves its own checkpoint
    (200, False, True, False),
])
def test_should_save(tmp_path, step, stopping, epoch_over, save):
    cfg = parse_config(["--run-dir", str(tmp_path), "--ckpt-every", "100"])
    assert Checkpointer(cfg, enabled=True).should_save(step, stopping, epoch_over) == save


def test_without_ckpt_every_only_a_stop_signal_saves_mid_epoch(tmp_path):
    ckpt = Checkpointer(parse_config(["--run-dir", str(tmp_path)]), enabled=True)
    assert not ckpt.should_save(100, False, False) and ckpt.should_save(7, True, False)


def test_the_training_state_round_trips_through_a_checkpoint_file(tmp_path):
    cfg = parse_config(["--run-dir", str(tmp_path)])
    torch.manual_seed(1)
    model = build("mlp", 16)
    opt = make_adam(model, 1e-3)
    model(torch.randn(4, 1, 28, 28)).sum().backward()
    opt.step()
    state = TrainState(
        epoch=2, batch_in_epoch=17, step=1041, best_acc=0.93, epoch_tally=EpochTally(3.5, 17, 900.0, 1088),
        wandb_run_id="abc12345", metrics=[{"step": 1000, "train_loss": 0.25}],
    )
    torch.manual_seed(99)
    path = checkpoint.save(checkpoint.snapshot(state, model, opt, cfg, 2, torch.device("cpu")), tmp_path, 3, True)
    drawn = torch.rand(3)  # what the saved RNG gives next
    loaded = checkpoint.load(path)
    assert TrainState.from_checkpoint(loaded) == state
    other = build("mlp", 16)
    other_opt = make_adam(other, 1e-3)
    checkpoint.restore(loaded, other, other_opt, torch.device("cpu"))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values(), strict=True))
    assert torch.equal(other_opt.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert torch.equal(torch.rand(3), drawn), "the random generators continue where they were saved"
    assert (tmp_path / "best.pt").samefile(path)


def test_a_check_that_fails_raises_on_every_rank_with_its_message(gloo_group):
    def refuse():
        raise UsageError("--epochs must be positive, got 0")
    with pytest.raises(UsageError, match="--epochs must be positive") as caught:
        gloo_group.check(refuse)
    assert caught.value.everywhere, "every rank raised it at the same point: rank 0 alone says it"
    assert gloo_group.check(lambda: 7, on="main") == 7 and gloo_group.from_main(lambda: {"a": 1}) == {"a": 1}
