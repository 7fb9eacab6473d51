"""--exact: the same bits from 1, 2, 4 and 8 ranks, either CPU transport, across a resize and an elastic
scale-down; world sizes it cannot serve refused. Real torchrun jobs on small synthetic data."""
from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys

import pytest
import torch

from helpers import ROOT, STARTED, children, job_env, metrics, run_train, send_when_step, start_train, summary, wait_for
from mnist_dist.errors import EXIT_USAGE

pytestmark = pytest.mark.slow  # whole training runs, several per test (left out by `make test-quick`)

FLAGS = {
    "mlp": ("--exact", "--pieces", "8", "--batch-size", "16", "--epochs", "2", "--log-every", "10", "--seed", "5"),
    "cnn": (
        "--exact", "--pieces", "8", "--model", "cnn", "--batch-size", "16", "--epochs", "1", "--log-every", "10",
        "--seed", "5",
    ),
}
# world size -> --cpu-allreduce: both transports, each against the one-process run
SIZES = {1: "auto", 2: "gloo", 4: "shm", 8: "auto"}
TIMING = ("samples_per_s", "elapsed_s", "epoch_train_s", "eval_s", "interval_steps", "rank_compute_s", "rank_wait_s")


def state_digest(run_dir) -> str:
    """SHA-256 of the final checkpoint's model and optimizer state (every tensor's bytes, in order)."""
    ckpt = torch.load(sorted((run_dir / "checkpoints").glob("ckpt-*.pt"))[-1], weights_only=True)
    h = hashlib.sha256()

    def add(obj):
        if isinstance(obj, torch.Tensor):
            h.update(obj.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(obj, dict):
            for key in sorted(obj, key=str):
                h.update(str(key).encode())
                add(obj[key])
        elif isinstance(obj, (list, tuple)):
            for item in obj:
                add(item)
        else:
            h.update(repr(obj).encode())
    add({"model": ckpt["model"], "optimizer": ckpt["optimizer"]})
    return h.hexdigest()


def values(run_dir) -> list[dict]:
    """metrics.jsonl without its timing fields and the hosts the ranks ran on (a record of its own)."""
    return [{k: v for k, v in r.items() if k not in TIMING} for r in metrics(run_dir) if "hosts" not in r]


@pytest.fixture(scope="module")
def exact_runs(small_data, tiny_data, tmp_path_factory):
    """Uninterrupted --exact runs: {(model, world size): run dir}. The MLP's on 2,048 images (the resize and
    elastic tests stop and resume it mid-epoch); the CNN's, whose pieces cost most, on 512 (32 steps)."""
    runs, data = {}, {"mlp": small_data, "cnn": tiny_data}
    for model in FLAGS:
        for size, transport in SIZES.items():
            run = tmp_path_factory.mktemp(f"exact-{model}-{size}") / "run"
            res = run_train(size, data[model], run, *FLAGS[model], "--cpu-allreduce", transport, timeout=300)
            assert res.returncode == 0, res.stderr
            runs[model, size] = run
    return runs


@pytest.mark.parametrize("model", FLAGS)
@pytest.mark.parametrize("size", [2, 4, 8])
def test_any_world_size_gives_the_one_process_runs_bits(exact_runs, model, size):
    """Weights, Adam's state, the test loss and every logged value: bitwise those of one process."""
    run, one = exact_runs[model, size], exact_runs[model, 1]
    assert summary(run)["world_size"] == size
    assert state_digest(run) == state_digest(one)
    assert summary(run)["fingerprint"] == summary(one)["fingerprint"]
    assert summary(run)["test_loss"] == summary(one)["test_loss"]
    assert values(run) == values(one)


def test_the_fingerprint_is_the_final_weights_and_is_printed(exact_runs, small_data, tmp_path):
    """summary.json's fingerprint is the SHA-256 of the final weights: another seed gives another one;
    the last line the job prints names it."""
    from mnist_dist.checkpoint import fingerprint

    run = exact_runs["mlp", 1]
    ckpt = torch.load(sorted((run / "checkpoints").glob("ckpt-*.pt"))[-1], weights_only=True)
    assert summary(run)["fingerprint"] == fingerprint(ckpt["model"])
    other = tmp_path / "other"
    flags = list(FLAGS["mlp"])
    flags[flags.index("--seed") + 1] = "6"
    res = run_train(1, small_data, other, *flags)
    assert res.returncode == 0, res.stderr
    assert summary(other)["fingerprint"] != summary(run)["fingerprint"]
    assert f"fingerprint {summary(other)['fingerprint']}" in res.stdout.splitlines()[-1]


def test_the_exact_models_learn(exact_runs):
    assert summary(exact_runs["mlp", 1])["test_acc"] >= 0.9
    assert summary(exact_runs["cnn", 1])["test_acc"] >= 0.9


def test_stopped_at_4_ranks_resumed_at_2_then_1_ends_with_the_same_bits(exact_runs, small_data, tmp_path):
    """A resize: SIGTERM mid-epoch at 4 ranks, resume at 2 and stop again, finish at 1: the state,
    fingerprint and metrics of the uninterrupted run."""
    run, flags = tmp_path / "run", FLAGS["mlp"]
    for size, at_step in ((4, 40), (2, 170)):
        proc = start_train(size, small_data, run, *flags)
        send_when_step(proc, run, signal.SIGTERM, at_step)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode != 0 and "stopped by SIGTERM" in err, err
    state = torch.load(sorted((run / "checkpoints").glob("ckpt-*.pt"))[-1], weights_only=True)
    assert state["world_size"] == 2 and 0 < state["batch_in_epoch"] < 128, "stopped in the middle of epoch 2"
    res = run_train(1, small_data, run, *flags)
    assert res.returncode == 0, res.stderr
    assert "saved with world size 2, now 1" in res.stdout
    one = exact_runs["mlp", 1]
    assert state_digest(run) == state_digest(one)
    assert summary(run)["fingerprint"] == summary(one)["fingerprint"]
    assert values(run) == values(one)


def test_elastic_scale_down_after_a_lost_node_ends_with_the_same_bits(exact_runs, small_data, tmp_path):
    """torchrun --nnodes=1:2, two ranks per node: node B is killed for good mid-run; node A's agent
    re-rendezvouses alone, its two ranks resume from the newest checkpoint and finish with the bits
    of the uninterrupted run."""
    from mnist_dist.distributed import free_port

    run, port = tmp_path / "run", free_port()
    flags = (*FLAGS["mlp"], "--ckpt-every", "20", "--data-dir", str(small_data), "--run-dir", str(run),
             "--no-verify-data", "--no-download")

    def node() -> subprocess.Popen:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1:2", "--nproc-per-node=2",
               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=exact-elastic",
               "--rdzv-conf=join_timeout=60,last_call_timeout=5,close_timeout=5", "--max-restarts=2",
               "--monitor-interval=0.5", "-m", "mnist_dist.train", *flags]
        proc = subprocess.Popen(cmd, cwd=ROOT, env=job_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
        STARTED.append(proc)  # killed after the test if still alive
        return proc

    a = node()  # first: it hosts the rendezvous store, and survives
    wait_for(lambda: f":{port} " in subprocess.run(["ss", "-Hltn"], capture_output=True, text=True).stdout,
             what="node A's rendezvous store")
    b = node()
    wait_for(lambda: any(r.get("step", 0) >= 60 for r in metrics(run)), timeout=120, what="step 60 at 4 ranks")
    for pid in [b.pid, *children(b)]:  # torchrun's workers have sessions of their own
        os.kill(pid, signal.SIGKILL)  # node B is gone: its agent and both its ranks
    b.wait()
    out, err = a.communicate(timeout=240)
    assert a.returncode == 0, err[-3000:]
    assert "saved with world size 4, now 2" in out
    one = exact_runs["mlp", 1]
    assert summary(run)["world_size"] == 2
    assert state_digest(run) == state_digest(one)
    assert summary(run)["fingerprint"] == summary(one)["fingerprint"]


def test_a_world_size_that_cannot_share_the_pieces_is_refused_on_every_rank(small_data, tmp_path):
    """3 ranks and 8 pieces: one line naming the sizes that work, exit 2 on every rank, nothing trained."""
    run = tmp_path / "run"
    res = run_train(3, small_data, run, *FLAGS["mlp"], timeout=60)
    assert res.returncode != 0
    lines = [line for line in res.stderr.splitlines() if "--exact" in line]
    assert len(lines) == 1, res.stderr
    assert "8 pieces" in lines[0] and "3 ranks" in lines[0] and "1, 2, 4 or 8" in lines[0]
    assert res.stderr.count("Traceback") == 1 and "ChildFailedError" in res.stderr, "torchrun's own report only"
    # each rank refuses on its own; torchrun ends the ranks still starting when the first exits (SIGTERM)
    codes = [int(c) for c in re.findall(r"exitcode  : (-?\d+)", res.stderr)]
    assert EXIT_USAGE in codes and set(codes) <= {EXIT_USAGE, -15}, res.stderr[-2000:]
    assert not list(run.glob("checkpoints/*.pt")) and not any("train_loss" in r for r in metrics(run))


def test_exact_is_part_of_the_trajectory_a_resume_must_match(exact_runs, small_data, tmp_path):
    """A checkpoint written with --exact does not resume without it: the steps would differ."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(exact_runs["mlp", 1], run)
    flags = [f for f in FLAGS["mlp"] if f != "--exact"]
    res = run_train(1, small_data, run, *flags)
    assert res.returncode == EXIT_USAGE
    assert "--exact True (saved) vs False (now)" in res.stderr


# --- the parts, in this process ---------------------------------------------------------------------

def exact_step(model_name: str, world_size: int = 1, rank: int = 0, device: str = "cpu", **cfg):
    from mnist_dist import model as models
    from mnist_dist.config import Config
    from mnist_dist.distributed import DistEnv
    from mnist_dist.exact import ExactStep

    torch.manual_seed(0)
    net = models.build(model_name).to(device)
    config = Config(exact=True, model=model_name, batch_size=16, pieces=8, **cfg)
    return net, ExactStep(net, config, DistEnv(rank, rank, world_size, "127.0.0.1", 0), torch.device(device))


def batch(n: int = 16, device: str = "cpu"):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 1, 28, 28, generator=g).to(device), torch.randint(0, 10, (n,), generator=g).to(device)


def test_the_written_out_mlp_gradient_is_autograds():
    """The MLP's hand-written piece gradient agrees with autograd on the whole batch (to rounding)."""
    import torch.nn.functional as F

    net, step = exact_step("mlp")
    x, y = batch()
    loss, logits = step(x, y, 0)
    exact = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    reference = F.cross_entropy(net(x), y)
    reference.backward()
    assert torch.allclose(loss, reference, rtol=1e-6)
    assert torch.allclose(logits, net(x), atol=1e-6)
    for g, p in zip(exact, net.parameters(), strict=True):
        assert torch.allclose(g, p.grad, rtol=1e-5, atol=1e-7)


def test_the_cnn_step_is_the_mean_of_the_pieces_gradients_with_batch_norm_per_piece():
    """The CNN through autograd: its gradient is the mean of the pieces' gradients, each piece normalised
    by its own statistics; the running statistics move once per step."""
    import torch.nn.functional as F

    net, step = exact_step("cnn")
    x, y = batch()
    norm, before = net[1], net[1].running_mean.clone()
    for dropout in step.terms.dropouts:
        dropout.p = 0.0  # the reference below has no masks to match
    loss, _ = step(x, y, 3)
    assert norm.num_batches_tracked.item() == 1 and not torch.equal(norm.running_mean, before)
    exact = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    per_piece = sum(F.cross_entropy(net(xp), yp) for xp, yp in zip(x.split(2), y.split(2), strict=True)) / 8
    per_piece.backward()
    assert torch.allclose(loss, per_piece, rtol=1e-5)
    for g, p in zip(exact, net.parameters(), strict=True):
        assert torch.allclose(g, p.grad, rtol=1e-4, atol=1e-6)


def test_the_tree_adds_in_its_fixed_order():
    """((t0 + t1) + (t2 + t3)): terms whose sum depends on the order get exactly the tree's answer."""
    from mnist_dist.exact import buffers_like, tree_sum

    terms = torch.tensor([1e8, 1.0, -1e8, 1.0], dtype=torch.float32)
    out = torch.zeros(1)
    tree_sum(lambda q, i: levels[i].fill_(terms[q].item()), 4, levels := buffers_like(out, 2))
    assert out.item() == ((terms[0] + terms[1]) + (terms[2] + terms[3])).item()
    assert out.item() != ((terms[0] + terms[2]) + terms[1] + terms[3]).item(), "an order that differs"


def test_the_exchange_adds_the_ranks_partial_sums_in_the_trees_order_and_sends_2_w_minus_1_over_w():
    """8 gloo ranks (three levels of halving, then doubling), rows of odd length whose sum depends on the
    order of additions: every rank ends with the bits of one process's tree, having sent 2(W-1)/W of a row."""
    import json

    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=8",
                          str(ROOT / "tests" / "scripts" / "tree_exchange.py")], cwd=ROOT, env=job_env(),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    ranks = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert sorted(r["rank"] for r in ranks) == list(range(8))
    assert all(r["tree_bits"] for r in ranks), ranks
    assert all(r["order_shows"] for r in ranks), "rows whose sum does not depend on the order prove nothing"
    assert all(abs(r["sent"] - 2 * 7 / 8 * 1001) <= 3 for r in ranks), ranks


def test_dropout_masks_belong_to_the_sample_not_the_rank():
    """The mask of a sample is a function of (seed, step, position in the global batch) alone."""
    from mnist_dist.exact import keyed_uniform

    u = keyed_uniform(5, 7, torch.arange(16), 3136)
    assert torch.equal(keyed_uniform(5, 7, torch.arange(8, 16), 3136), u[8:])  # another rank holds them
    assert not torch.equal(keyed_uniform(5, 8, torch.arange(16), 3136), u)    # the next step
    assert not torch.equal(keyed_uniform(6, 7, torch.arange(16), 3136), u)    # another seed
    keep = (u >= 0.25).float().mean().item()
    assert 0.74 < keep < 0.76 and u.min() >= 0 and u.max() < 1


@pytest.mark.parametrize("world_size", [2, 4, 8])
def test_every_world_size_trains_the_same_global_batches_in_the_same_order(world_size):
    from mnist_dist.data import exact_epoch_indices

    cpu = torch.device("cpu")
    one = exact_epoch_indices(100, 0, 1, 3, 2, 16, cpu)
    assert len(one) == 112 and torch.equal(one[100:], one[:12]), "padded to whole batches with its first samples"
    ranks = [exact_epoch_indices(100, r, world_size, 3, 2, 16, cpu).view(7, -1) for r in range(world_size)]
    assert torch.equal(torch.cat(ranks, dim=1).reshape(-1), one)


@pytest.mark.parametrize("flags, message", [
    ({"pieces": 6}, "--pieces must be a power of two that divides --batch-size 64, got 6"),
    ({"pieces": 0}, "--pieces must be positive, got 0"),
    ({"pieces": 128}, "--pieces must be a power of two that divides --batch-size 64, got 128"),
    ({"deterministic": False}, "--exact needs deterministic kernels"),
])
def test_pieces_that_cannot_work_are_refused(flags, message):
    from mnist_dist.config import Config
    from mnist_dist.errors import UsageError

    with pytest.raises(UsageError, match=message):
        Config(exact=True, **flags).validate(1)
    with pytest.raises(UsageError, match="which 6 ranks cannot share evenly: start 1, 2, 4 or 8 ranks"):
        Config(exact=True, pieces=8).validate(6)
    with pytest.raises(UsageError, match="4 pieces, which 8 ranks cannot share evenly: start 1, 2 or 4 ranks"):
        Config(exact=True).validate(8)  # the default
    Config(exact=True, pieces=4, batch_size=12).validate(4)


@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
def test_on_gpus_the_partial_sums_travel_by_nccl_send_and_recv_never_all_reduce(monkeypatch, model_name):
    """Simulated: rank 1 of four, its tensors off the CPU (the 'meta' device), exchanges halves with rank 0
    (its sibling), then quarters with rank 3, then gathers back in reverse: by the process group's
    point-to-point sends (NCCL), nothing added inside a collective, 2(W-1)/W of its row sent."""
    from fakes import nccl_collectives

    calls = nccl_collectives(monkeypatch, 4)
    net, step = exact_step(model_name, world_size=4, rank=1, device="meta")
    assert "nccl send/recv" in step.exchange_info.how
    x, y = batch(4, "meta")
    loss, logits = step(x, y, 0)
    n = step.root.numel()
    sends = [c.split() for c in calls if c.startswith("send")]
    assert len(calls) == 8 and all(c.startswith(("send", "recv")) for c in calls), calls
    assert [int(c[-1]) for c in sends] == [0, 3, 3, 0]  # partners: the sibling, then the sibling subtree's
    assert sum(int(c[1]) for c in sends) == pytest.approx(2 * 3 / 4 * n, abs=4)
    assert step.exchange_info.sent_bytes == 4 * sum(int(c[1]) for c in sends)
    assert loss.device.type == "meta" and logits.shape == (4, 10)
    assert all(p.grad is not None and p.grad.device.type == "meta" for p in net.parameters())
