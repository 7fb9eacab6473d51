"""The CUDA/nccl and multi-node paths, driven on this CPU-only machine: checkpoints saved on a GPU,
the 'meta' device, fake GPUs (tests/fakes.py), and two torchrun agents as two nodes."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
import torch

from helpers import (
    ROOT, assert_same_params, final_ckpt, job_env, kill_worker, run_train, start_train, summary, wait_for,
)
from fakes import fake_cuda, nccl_flight_recorder, save_on_cuda
from mnist_dist import checkpoint, devices, distributed, locks, optim, postmortem
from mnist_dist.config import parse_config
from mnist_dist.model import build

pytestmark = pytest.mark.slow  # whole training runs, several per test (left out by `make test-quick`)


@pytest.fixture(scope="module")
def trained_run(tiny_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("trained") / "run"
    res = run_train(1, tiny_data, run, "--epochs", "1", "--batch-size", "32", "--ckpt-every", "8")
    assert res.returncode == 0, res.stderr
    return run


def gpu_checkpoint(cpu_ckpt, path):
    """The CPU checkpoint as a GPU job saves it: every storage tagged cuda:0, a CUDA RNG state."""
    state = torch.load(cpu_ckpt, weights_only=True)
    state["rng"]["cuda"] = torch.Generator().manual_seed(7).get_state()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_on_cuda(state, path)
    with pytest.raises(RuntimeError, match="CUDA"):  # the fake is real enough: torch itself refuses it here
        torch.load(path, weights_only=True)
    return path


@pytest.mark.filterwarnings("ignore:.*copying from a non-meta parameter")  # meta tensors hold no values
def test_resume_state_stays_on_the_cpu_whatever_the_training_device(trained_run):
    """Resuming with the model on another device ('meta' here, cuda:N on a GPU): the RNG states
    must stay CPU tensors, which torch.set_rng_state requires (it failed when loaded to the device)."""
    cfg = parse_config(["--run-dir", str(trained_run), "--batch-size", "32"])
    state = checkpoint.resume_point(cfg)
    assert all(t.device.type == "cpu" for t in state["model"].values())
    meta = torch.device("meta")
    model = build("mlp", 128).to(meta)
    opt = optim.make_adam(model, 1e-3)
    torch.manual_seed(123)
    checkpoint.restore(state, model, opt, meta)
    assert torch.equal(torch.get_rng_state(), state["rng"]["torch"])
    assert next(model.parameters()).device == meta and opt.state_dict()["state"][0]["exp_avg"].device == meta


def test_checkpoint_saved_on_a_gpu_resumes_and_serves_every_command(trained_run, tiny_data, tmp_path):
    """A checkpoint whose storages say cuda:0: evaluate, predict, export, report and resume on a CPU."""
    run = tmp_path / "run"
    ckpt = gpu_checkpoint(final_ckpt(trained_run), run / "checkpoints" / "ckpt-00000016.pt")
    (run / "metrics.jsonl").write_text((trained_run / "metrics.jsonl").read_text())
    png = tmp_path / "digit.png"
    from PIL import Image
    img = Image.new("L", (40, 40), 0)
    img.paste(255, (15, 8, 25, 32))
    img.save(png)
    cli = [sys.executable, "-m", "mnist_dist.cli"]
    for args in (["evaluate", "--checkpoint", str(ckpt), "--data-dir", str(tiny_data), "--no-verify-data"],
                 ["predict", "--checkpoint", str(ckpt), str(png)],
                 ["export", "--checkpoint", str(ckpt), str(tmp_path / "model.safetensors")],
                 ["report", str(run), "--data-dir", str(tiny_data), "--no-verify-data"]):
        res = subprocess.run(cli + args, cwd=ROOT, env=job_env(), capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, (args[0], res.stderr)
    res = run_train(1, tiny_data, run, "--epochs", "2", "--batch-size", "32")
    assert res.returncode == 0, res.stderr
    assert "resuming at epoch 2, batch 0 (step 16)" in res.stdout and summary(run)["epochs"] == 2


def test_cuda_rng_state_is_the_ranks_own_gpu_whatever_the_gpus_visible():
    """Saved under torchrun with 8 GPUs visible (rank 0 on cuda:0), resumed where each task sees only
    its own GPU, or all 8: every rank continues from rank 0's generator (the CNN's dropout masks)."""
    with fake_cuda(8) as gens:
        torch.manual_seed(5)  # seeds every GPU's generator, as in training
        torch.rand(3, generator=gens[0])  # rank 0's dropout draws
        saved = checkpoint.rng_state(torch.device("cuda", 0))
        assert torch.equal(saved["cuda"], gens[0].get_state())
    for visible, device in ((1, torch.device("cuda", 0)), (8, torch.device("cuda", 3))):
        with fake_cuda(visible) as gens:
            checkpoint.set_rng_state(saved, device)  # raised IndexError with 1 visible
            assert torch.equal(gens[device.index].get_state(), saved["cuda"]), f"{visible} GPUs visible"


def test_more_ranks_than_gpus_is_refused_on_every_rank_before_nccl(tiny_data, tmp_path):
    """2 ranks on a node with 1 GPU: one line and exit 2 within seconds, not NCCL's traceback."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(ROOT / "tests" / "fakes.py"), "1", "-m", "mnist_dist.train", "--data-dir", str(tiny_data),
           "--run-dir", str(tmp_path / "run"), "--no-verify-data"]
    start = time.monotonic()
    res = subprocess.run(cmd, cwd=ROOT, env=job_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    assert "exitcode  : 2" in res.stderr and "mnist_dist/" not in res.stderr, "no traceback from the ranks"
    assert res.stderr.count("mnist-dist: error: ranks 0, 1 would share GPU 0") == 1, res.stderr
    assert "one rank per GPU" in res.stderr
    assert time.monotonic() - start < 60


def test_deterministic_kernels_on_gpus_and_nothing_changes_on_the_cpu(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = (
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
        torch.are_deterministic_algorithms_enabled(),
    )
    try:
        devices.make_deterministic(torch.device("cpu"), True)
        assert (torch.backends.cudnn.deterministic, torch.are_deterministic_algorithms_enabled()) == (False, False)
        devices.make_deterministic(torch.device("cuda", 0), False)
        assert not torch.are_deterministic_algorithms_enabled()
        devices.make_deterministic(torch.device("cuda", 0), True)
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert torch.are_deterministic_algorithms_enabled() and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[:2]
        torch.use_deterministic_algorithms(before[2])


def test_nccl_keeps_a_flight_recorder_unless_the_user_chose():
    on_gpus, on_cpus, chosen = {}, {}, {"TORCH_FR_BUFFER_SIZE": "0"}
    postmortem.record_collectives("nccl", on_gpus)
    postmortem.record_collectives("gloo", on_cpus)
    postmortem.record_collectives("nccl", chosen)
    assert (on_gpus, on_cpus, chosen) == ({"TORCH_FR_BUFFER_SIZE": "2000"}, {}, {"TORCH_FR_BUFFER_SIZE": "0"})


def test_a_hang_on_nccl_keeps_nccls_flight_recorder_dump(monkeypatch, tmp_path):
    """The post-mortem of an NCCL rank holds NCCL's own Flight Recorder record (simulated: no NCCL here)."""
    monkeypatch.setenv("TORCH_FR_BUFFER_SIZE", "2000")
    nccl_flight_recorder(monkeypatch, b'{"entries": [{"profiling_name": "nccl:all_reduce"}]}')
    postmortem.write(tmp_path / "hang", 3, 8, [5], "the hang line", {})
    assert (
        (tmp_path / "hang" / "rank-3.flight-recorder.json")
        .read_bytes()
        .startswith(b'{"entries": [{"profiling_name": "nccl')
    )
    report = postmortem.read_report(tmp_path / "hang" / "rank-3.txt")
    assert report["rank"] == "3 of 8" and report["waiting for"] == "rank 5"


def test_the_suite_and_the_bench_hide_gpus():
    """On a GPU machine the suite must still test the CPU path it asserts (and the bench compare like with like)."""
    assert job_env()["CUDA_VISIBLE_DEVICES"] == "" and os.environ["CUDA_VISIBLE_DEVICES"] == ""
    sys.path.insert(0, str(ROOT / "bench"))
    import bench

    assert (
        "--device" in bench.our_cmd(1, "DATA", ROOT / "run", "cpu")
        and bench.env_for("cpu")["CUDA_VISIBLE_DEVICES"] == ""
    )
    assert "cuda" in bench.conventional_cmd(2, "DATA", 1, "cuda")


def two_nodes(data, run_dirs, *flags, port=None):
    """Two torchrun agents as two nodes (static rendezvous on this host), one rank each."""
    port = port or distributed.free_port()
    per_node = flags if isinstance(flags[0], tuple) else (flags, flags)
    procs = []
    for node, run in enumerate(run_dirs):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={node}", "--nproc-per-node=1",
               "--master-addr=127.0.0.1", f"--master-port={port}", "-m", "mnist_dist.train", "--data-dir", str(data),
               "--run-dir", str(run), "--no-verify-data", *per_node[node]]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=job_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, start_new_session=True))
    try:
        return [(p.wait(timeout=180), *p.communicate()) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)


FLAGS = ("--batch-size", "16", "--seed", "2")


@pytest.fixture(scope="module")
def two_node_reference(tiny_data, tmp_path_factory):
    """Two nodes sharing one run dir, 2 epochs uninterrupted: the model the resumed runs must end with."""
    ref = tmp_path_factory.mktemp("two-nodes") / "ref"
    assert all(rc == 0 for rc, _, _ in two_nodes(tiny_data, [ref, ref], "--epochs", "2", *FLAGS))
    return ref


def test_two_nodes_with_node_local_run_dirs_resume_from_rank_0s_checkpoint(two_node_reference, tiny_data, tmp_path):
    """Node 1's run dir is empty: every rank still resumes from rank 0's checkpoint, to the same model."""
    a, b = tmp_path / "node0", tmp_path / "node1"
    assert all(rc == 0 for rc, _, _ in two_nodes(tiny_data, [a, b], "--epochs", "1", *FLAGS))
    for path in (b / "checkpoints").glob("*.pt"):
        path.unlink()  # as on a node-local disk that node 1 never wrote to
    results = two_nodes(tiny_data, [a, b], "--epochs", "2", *FLAGS)
    assert all(rc == 0 for rc, _, _ in results), results
    assert "resuming at epoch 2" in results[0][1]
    assert_same_params(a, two_node_reference)  # both ranks resumed from the same step and state


def test_rank_0_with_an_empty_run_dir_resumes_from_the_newest_checkpoint_another_node_holds(two_node_reference,
                                                                                            tiny_data, tmp_path):
    """After an elastic change rank 0 can land on a node whose run dir has no checkpoint: the newest any
    node holds is the resume point (here node 1's, from an epoch it ran as rank 0 alone)."""
    a, b = tmp_path / "node0", tmp_path / "node1"
    assert all(rc == 0 for rc, _, _ in two_nodes(tiny_data, [b, a], "--epochs", "1", *FLAGS))
    assert not (a / "checkpoints").exists()
    results = two_nodes(tiny_data, [a, b], "--epochs", "2", *FLAGS)
    assert all(rc == 0 for rc, _, _ in results), results
    assert "resuming at epoch 2" in results[0][1]
    assert_same_params(a, two_node_reference)


def test_a_restart_that_finds_no_checkpoint_a_round_before_saved_says_so(medium_data, tmp_path):
    """torchrun --max-restarts: the checkpoints an earlier round saved are gone when the group restarts
    (they were on a node that left): one warning line names the step and the host, then it starts over."""
    run = tmp_path / "run"
    proc = start_train(2, medium_data, run, "--batch-size", "8", "--epochs", "3", "--ckpt-every", "0", restarts=1)
    # the save is complete once best.pt points at it and it is noted (not a folder removed mid-save)
    wait_for(lambda: (run / "checkpoints" / "best.pt").exists() and (run / ".newest-checkpoint").exists()
             or proc.poll() is not None, timeout=120,
             what="the first epoch's checkpoint")
    saved = sorted((run / "checkpoints").glob("ckpt-*.pt"))[-1]
    shutil.rmtree(run / "checkpoints")
    kill_worker(proc, 1)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    step = int(saved.stem.split("-")[1])
    assert f"warning: this job saved a checkpoint at step {step} on {socket.gethostname()}, but no node here holds " \
           f"one that new" in err and "training goes on from step 0" in err, err


def test_ranks_started_with_different_flags_are_refused(tiny_data, tmp_path):
    run = tmp_path / "run"
    results = two_nodes(tiny_data, [run, run], ("--epochs", "2", *FLAGS), ("--epochs", "3", *FLAGS))
    assert [rc for rc, _, _ in results] != [0, 0]
    line = "mnist-dist: error: rank 1 was started with other flags than rank 0: --epochs 3 (rank 0: 2)"
    assert all(err.count(line) == 1 for _, _, err in results), "each node's log says why, once"


def test_nodes_sharing_a_data_dir_take_turns_at_the_download(tiny_data, tmp_path):
    """Another node is downloading into the shared data dir (it holds the lock; a file is still
    missing): the job waits for it, then trains on the files it brought, without downloading again."""
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    raw = data / "MNIST" / "raw"
    late = raw / "t10k-labels-idx1-ubyte"
    kept = late.read_bytes()
    late.unlink()
    with locks.waiting(raw / ".lock", "held by the test"):  # the other node's download
        proc = subprocess.Popen([sys.executable, "-m", "mnist_dist.train", "--data-dir", str(data), "--no-verify-data",
                                 "--run-dir", str(tmp_path / "run"), "--epochs", "1"], cwd=ROOT, env=job_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        first = proc.stderr.readline()
        assert "waiting for another process to finish downloading MNIST" in first, first
        time.sleep(1)
        assert proc.poll() is None, "it waits for the download under way"
        late.write_bytes(kept)  # the other node's download completes
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert summary(tmp_path / "run")["test_images"] == 200
