"""--grad-compression: fp16, bf16 and PowerSGD through torch's DDP comm hooks, on real 2-rank gloo jobs; what
each says it sends; PowerSGD's per-rank state through a SIGTERM and a resume, bit for bit; a world-size
change and a broken state; the flags that cannot work together."""
from __future__ import annotations

import re
import shutil
import signal

import pytest
import torch

from helpers import assert_same_params, final_ckpt, run_train, send_when_step, start_train, summary
from mnist_dist.errors import EXIT_USAGE

pytestmark = pytest.mark.slow  # whole training runs

FLAGS = ("--batch-size", "16", "--log-every", "10", "--seed", "5", "--epochs", "1", "--powersgd-start", "10")
KINDS = ("none", "fp16", "bf16", "powersgd")


@pytest.fixture(scope="module")
def runs(small_data, tmp_path_factory) -> dict:
    """2-rank runs, one per compression: {kind: (run dir, stdout)}."""
    out = {}
    for kind in KINDS:
        run = tmp_path_factory.mktemp(f"compression-{kind}") / "run"
        res = run_train(2, small_data, run, *FLAGS, "--grad-compression", kind)
        assert res.returncode == 0, res.stderr[-3000:]
        out[kind] = run, res.stdout
    return out


def banner(stdout: str) -> str:
    return next(line for line in stdout.splitlines() if line.startswith("2 ranks on cpu;"))


@pytest.mark.parametrize("kind", KINDS[1:])
def test_each_compression_trains_and_says_what_it_sends(runs, kind):
    """The start-up line names the exchange, the compression and the bytes per step; the hook is in effect
    (another model than the uncompressed run's) and the model learns as well."""
    run, stdout = runs[kind]
    line = banner(stdout)
    values = sum(p.numel() for p in torch.load(final_ckpt(run), weights_only=True)["model"].values())
    sent = {"fp16": values * 2, "bf16": values * 2,
            # PowerSGD at rank 2: P (n x 2) and Q (m x 2) of each matrix (784 -> 128 -> 10), the biases whole
            "powersgd": ((128 + 784) * 2 + (10 + 128) * 2 + 128 + 10) * 4}[kind]
    size = re.search(r"\(([\d.]+) (kB|MB) a step instead of 0\.407 MB", line)
    assert "gloo all_reduce" in line and size, line
    assert float(size[1]) * (1e3 if size[2] == "kB" else 1e6) == pytest.approx(sent, rel=0.005), line
    assert (kind if kind != "powersgd" else "PowerSGD rank 2 from step 10") in line
    assert "shared memory" in banner(runs["none"][1]) and "no compression (0.407 MB a step)" in banner(runs["none"][1])
    assert summary(run)["fingerprint"] != summary(runs["none"][0])["fingerprint"]
    assert summary(run)["test_acc"] >= summary(runs["none"][0])["test_acc"] - 0.02


@pytest.mark.parametrize("model, data", [("mlp", "small_data"), ("cnn", "tiny_data")])
def test_powersgd_stopped_mid_epoch_resumes_to_the_uninterrupted_bits(model, data, request, runs, tmp_path):
    """SIGTERM after PowerSGD has started (step 10), then the same command: the uninterrupted run's weights.
    DDP regroups its buckets after its first step, so the resumed run's first step lays the state out
    otherwise than the saved run's; the checkpoint holds it per parameter, for each rank."""
    data = request.getfixturevalue(data)
    flags = (*FLAGS, "--grad-compression", "powersgd", "--model", model, *(("--epochs", "2") if model == "cnn" else ()))
    if model == "mlp":
        reference = runs["powersgd"][0]
    else:
        reference = tmp_path / "reference"
        assert run_train(2, data, reference, *flags).returncode == 0
    run = tmp_path / "run"
    proc = start_train(2, data, run, *flags)
    send_when_step(proc, run, signal.SIGTERM, 20)
    _, err = proc.communicate(timeout=120)
    assert "stopped by SIGTERM" in err, err[-2000:]
    ckpt = torch.load(final_ckpt(run), weights_only=True)
    saved = ckpt["compression"]
    assert ckpt["batch_in_epoch"] > 0 and saved["world_size"] == 2 and saved["iter"] == ckpt["step"] > 10
    errors = [rank["1.weight" if model == "mlp" else "0.weight"]["error"] for rank in saved["ranks"]]
    assert errors[0].shape == ckpt["model"]["1.weight" if model == "mlp" else "0.weight"].shape
    assert not torch.equal(errors[0], errors[1]), "each rank's own error feedback"
    res = run_train(2, data, run, *flags)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resuming at epoch" in res.stdout and "PowerSGD state" not in res.stderr
    assert_same_params(run, reference)


def test_a_world_size_change_starts_powersgd_afresh_in_one_line(runs, small_data, tmp_path):
    """The 2-rank run's checkpoint, resumed by 4 ranks: one line says the state begins afresh; it trains on."""
    run = tmp_path / "run"
    shutil.copytree(runs["powersgd"][0], run)
    (run / "summary.json").unlink()
    res = run_train(4, small_data, run, *FLAGS, "--grad-compression", "powersgd", "--epochs", "2")
    assert res.returncode == 0, res.stderr[-2000:]
    lines = [line for line in res.stderr.splitlines() if "PowerSGD state" in line]
    assert lines == ["mnist-dist: warning: the checkpoint's PowerSGD state is from 2 ranks, now 4: its error "
                     "feedback and warm start begin afresh"], res.stderr[-2000:]
    assert summary(run)["world_size"] == 4 and summary(run)["test_acc"] > 0.9


def test_a_broken_powersgd_state_is_refused_in_one_line(runs, small_data, tmp_path):
    """A checkpoint whose error feedback has the wrong shape: one line, exit 2, the checkpoint kept."""
    run = tmp_path / "run"
    shutil.copytree(runs["powersgd"][0], run)
    path = final_ckpt(run)
    ckpt = torch.load(path, weights_only=True)
    ckpt["compression"]["ranks"][1]["1.weight"]["error"] = torch.zeros(3)
    torch.save(ckpt, path)
    res = run_train(2, small_data, run, *FLAGS, "--grad-compression", "powersgd", "--epochs", "2")
    assert res.returncode == 1 and f"exitcode  : {EXIT_USAGE}" in res.stderr  # torchrun's, for its workers' 2
    errors = [line for line in res.stderr.splitlines() if line.startswith("mnist-dist: error:")]
    assert len(errors) == 1 and "PowerSGD state is unusable" in errors[0], res.stderr[-3000:]
    assert "Traceback" not in res.stderr.split("failed (exitcode")[0], "no worker's traceback, before torchrun's own"
    assert path.exists()


@pytest.mark.parametrize("flags, message", [
    (("--exact", "--grad-compression", "fp16"), "--grad-compression fp16 changes the gradients' bits by design"),
    (("--cpu-allreduce", "shm", "--grad-compression", "powersgd"), "use --cpu-allreduce auto or gloo"),
    (("--powersgd-start", "1"), "--powersgd-start at least 2"),
])
def test_flags_that_cannot_work_are_refused_in_one_line(flags, message, tiny_data, tmp_path):
    res = run_train(1, tiny_data, tmp_path / "run", *flags)
    assert res.returncode == EXIT_USAGE and message in res.stderr, res.stderr
    assert len([line for line in res.stderr.splitlines() if line.strip()]) <= 3 and "Traceback" not in res.stderr


def test_bf16_is_refused_where_the_process_group_cannot_all_reduce_it(monkeypatch):
    """Some torch releases' gloo cannot all_reduce bfloat16: refused before training, in one line."""
    import torch.distributed as dist

    from mnist_dist import compression
    from mnist_dist.config import Config
    from mnist_dist.errors import UsageError
    from mnist_dist.model import build

    def unsupported(tensor, *args, **kwargs):
        raise RuntimeError(f"Unsupported data type for gloo allreduce: {tensor.dtype}\nmore")
    monkeypatch.setattr(dist, "all_reduce", unsupported)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    with pytest.raises(UsageError, match=r"bf16: gloo in torch .* cannot all_reduce bfloat16 \(Unsupported data "
                                         r"type for gloo allreduce: torch.bfloat16\); use --grad-compression fp16"):
        compression.make(Config(grad_compression="bf16"), build("mlp"), torch.device("cpu"), 2)
    assert compression.make(Config(grad_compression="fp16"), build("mlp"), torch.device("cpu"), 2).hook





def test_on_gpus_bf16_is_tried_once_by_the_process_group_before_training(monkeypatch):
    """Simulated nccl (tensors on the 'meta' device): the bf16 probe is one all_reduce of the device's tensor;
    with one rank nothing is tried."""
    from fakes import nccl_collectives

    from mnist_dist import compression
    from mnist_dist.config import Config
    from mnist_dist.model import build

    calls = nccl_collectives(monkeypatch, 2)
    net = build("mlp").to("meta")
    cast = compression.make(Config(grad_compression="bf16"), net, torch.device("meta"), 2)
    assert calls == ["all_reduce"] and cast.payload_bytes == cast.full_bytes // 2
    compression.make(Config(grad_compression="bf16"), net, torch.device("meta"), 1)
    assert calls == ["all_reduce"]

