"""The training job on torchrun and plain python: outputs, rank independence, bad input."""
from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest
import torch

from helpers import (ROOT, assert_same_params, final_ckpt, job_env, kill_worker, metrics, params, run_train,
                     start_train, summary, wait_for)


def test_run_dir_holds_config_metrics_summary_and_checkpoints(tiny_data, tmp_path):
    """A one-process run writes the documented files with the documented keys."""
    run = tmp_path / "run"
    res = run_train(1, tiny_data, run, "--epochs", "2", "--batch-size", "32", "--log-every", "4")
    assert res.returncode == 0, res.stderr
    assert "epoch 2/2" in res.stdout and "test_acc" in res.stdout and "eta" in res.stdout
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["epochs"] == 2 and cfg["batch_size"] == 32 and cfg["hidden"] == 128
    records = metrics(run)
    steps = [r for r in records if "train_loss" in r]
    assert {"step", "epoch", "train_loss", "lr", "samples_per_s"} <= steps[0].keys()
    assert [r["step"] for r in steps][:3] == [4, 8, 12]
    evals = [r for r in records if "test_acc" in r]
    assert [r["epoch"] for r in evals] == [1, 2] and len(evals[0]["per_class_acc"]) == 10
    s = summary(run)
    for key in ("test_acc", "test_loss", "per_class_acc", "epochs", "world_size", "global_batch_size",
                "train_seconds", "total_seconds"):
        assert key in s
    assert s["world_size"] == 1 and s["global_batch_size"] == 32 and s["epochs"] == 2
    assert s["test_images"] == 200, "every test image is evaluated exactly once"
    assert 0 < s["train_seconds"] < s["total_seconds"]
    assert s["test_acc"] > 0.9, "the synthetic digits are easy"
    assert (run / "checkpoints" / "best.pt").exists()


SEED_RUNS = {  # the runs that the rank-independence tests read: (processes, flags)
    "one": (1, ("--epochs", "1", "--batch-size", "32", "--seed", "3")),
    "two": (2, ("--epochs", "1", "--batch-size", "32", "--seed", "3")),
    "gloo": (2, ("--epochs", "1", "--batch-size", "32", "--seed", "3", "--cpu-allreduce", "gloo")),
    "other_seed": (1, ("--epochs", "1", "--batch-size", "32", "--seed", "4")),
}


@pytest.fixture(scope="module")
def seed_run(tiny_data, tmp_path_factory):
    """seed_run(name) -> (run dir, stdout) of one of SEED_RUNS, trained once, on first use."""
    done = {}

    def get(name):
        if name not in done:
            nproc, flags = SEED_RUNS[name]
            run = tmp_path_factory.mktemp(name) / "run"
            res = run_train(nproc, tiny_data, run, *flags)
            assert res.returncode == 0, res.stderr
            done[name] = (run, res.stdout)
        return done[name]
    return get


def test_one_and_two_ranks_give_the_same_model(seed_run):
    """Same seed and global batch: 1 rank and 2 ranks (torchrun) end with the same parameters."""
    (one, _), (two, _) = seed_run("one"), seed_run("two")
    p1, p2 = params(final_ckpt(one)), params(final_ckpt(two))
    worst = max((p1[k] - p2[k]).abs().max().item() for k in p1)
    assert worst <= 1e-5, f"max abs parameter difference {worst}"
    assert summary(two)["world_size"] == 2
    assert summary(one)["test_acc"] == summary(two)["test_acc"]


def test_two_cpu_ranks_on_one_host_average_through_shared_memory(seed_run):
    assert "through shared memory" in seed_run("two")[1]


def test_gloo_averages_two_ranks_bit_for_bit_like_shared_memory(seed_run):
    """gloo's all_reduce gives bit for bit the same average of two ranks' gradients."""
    (two, _), (gloo, out) = seed_run("two"), seed_run("gloo")
    assert "gloo all_reduce" in out
    assert_same_params(gloo, two)


def test_nothing_is_profiled_unless_asked(seed_run):
    assert not (seed_run("one")[0] / "profile").exists()


def test_a_different_seed_gives_a_different_model(seed_run):
    """The comparisons above can fail: another seed really ends elsewhere."""
    p1, p3 = params(final_ckpt(seed_run("one")[0])), params(final_ckpt(seed_run("other_seed")[0]))
    assert max((p1[k] - p3[k]).abs().max().item() for k in p1) > 1e-3


@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
def test_optim_step_is_adam_step_bit_for_bit(model_name):
    """The loop's optim.step gives exactly torch.optim.Adam's step, across an lr change and a resume."""
    from mnist_dist import optim
    from mnist_dist.model import build

    torch.manual_seed(0)
    ours, ref = build(model_name), build(model_name)
    ref.load_state_dict(ours.state_dict())
    start = [p.detach().clone() for p in ours.parameters()]
    opt, ref_opt = optim.make_adam(ours, 1e-3), optim.make_adam(ref, 1e-3)
    for i in range(6):
        x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
        for model in (ours, ref):
            torch.manual_seed(i)  # the same dropout mask for both
            torch.nn.functional.cross_entropy(model(x), y).backward()
        optim.step(opt)
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
        assert all(p.grad is None for p in ours.parameters())
        if i == 2:  # an epoch boundary: the lr decays, and the run resumes from a checkpoint
            saved = io.BytesIO()
            torch.save(opt.state_dict(), saved)
            saved.seek(0)
            opt = optim.make_adam(ours, 1e-3)
            opt.load_state_dict(torch.load(saved, weights_only=True))
            for o in (opt, ref_opt):
                o.param_groups[0]["lr"] = 7e-4
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), ref.parameters(), strict=True))
    for a, b in zip(opt.state.values(), ref_opt.state.values(), strict=True):
        assert all(torch.equal(a[key], b[key]) for key in ("step", "exp_avg", "exp_avg_sq"))
    assert not any(torch.equal(a, b) for a, b in zip(ours.parameters(), start, strict=True)), "it trained"


def test_a_dead_rank_ends_the_job_promptly(medium_data, tmp_path):
    """kill -9 of one rank while the other waits for its gradients: the job exits non-zero, no hang."""
    run = tmp_path / "run"
    proc = start_train(2, medium_data, run, "--epochs", "50", "--batch-size", "32")
    wait_for(lambda: len(metrics(run)) >= 2, what="training to start")
    kill_worker(proc)
    proc.communicate(timeout=60)
    assert proc.returncode != 0


def test_console_script_and_toml_config(tiny_data, tmp_path):
    """`mnist-dist train --config F.toml` takes defaults from the file; flags override them."""
    toml = tmp_path / "c.toml"
    toml.write_text('epochs = 2\nbatch-size = 16\nhidden = 32\n')
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "mnist_dist.cli", "train", "--config", str(toml), "--epochs", "1",
           "--data-dir", str(tiny_data), "--run-dir", str(run), "--no-verify-data"]
    res = subprocess.run(cmd, cwd=ROOT, env=job_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    cfg = json.loads((run / "config.json").read_text())
    assert (cfg["epochs"], cfg["batch_size"], cfg["hidden"]) == (1, 16, 32)


@pytest.mark.parametrize("flags, message", [
    (["--epochs", "0"], "--epochs must be positive"),
    (["--lr", "-1"], "--lr must be a positive number"),
    (["--batch-size", "0"], "--batch-size must be positive"),
    (["--device", "cuda"], "no CUDA GPU"),
])
def test_bad_flags_give_one_line_and_exit_2(tiny_data, tmp_path, flags, message):
    res = run_train(1, tiny_data, tmp_path / "run", *flags)
    assert res.returncode == 2
    assert message in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_unknown_device_and_bad_config_file_are_refused(tiny_data, tmp_path):
    res = run_train(1, tiny_data, tmp_path / "run", "--device", "tpu")
    assert res.returncode == 2 and "invalid choice" in res.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text("epochz = 3\n")
    res = run_train(1, tiny_data, tmp_path / "run", "--config", str(bad))
    assert res.returncode == 2 and "unknown setting 'epochz'" in res.stderr


def test_batch_not_divisible_by_world_size(tiny_data, tmp_path):
    res = run_train(2, tiny_data, tmp_path / "run", "--batch-size", "33")
    assert res.returncode != 0
    assert "must be divisible by the world size 2" in res.stderr
    assert res.stderr.count("must be divisible") == 1, "one line, from rank 0 only"


def test_unwritable_run_dir(tiny_data, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    res = run_train(1, tiny_data, blocker / "run")
    assert res.returncode == 2 and "cannot write to --run-dir" in res.stderr


def test_missing_data_names_folder_and_fix(tmp_path):
    """No data and no download: one line naming the folder and what to do; both ranks exit, no hang."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "mnist_dist.train",
        "--data-dir", str(tmp_path / "nodata"), "--run-dir", str(tmp_path / "run"), "--no-download",
    ]
    res = subprocess.run(cmd, cwd=ROOT, env=job_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    assert f"{tmp_path / 'nodata' / 'MNIST' / 'raw'}" in res.stderr and "put the four IDX files" in res.stderr


def test_corrupt_data_fails_checksum(tiny_data, tmp_path):
    """Files that are not the official ones fail the SHA-256 check before training."""
    res = run_train(1, tiny_data, tmp_path / "run", "--verify-data")
    assert res.returncode == 2
    assert "does not match the official SHA-256" in res.stderr and "Traceback" not in res.stderr


def test_download_failure_is_one_line(tmp_path):
    """Offline machine with downloads allowed: a clear error, not a traceback."""
    env = job_env(http_proxy="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9")
    res = subprocess.run([sys.executable, "-m", "mnist_dist.cli", "download", "--data-dir", str(tmp_path / "d")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2
    assert "could not download MNIST" in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
