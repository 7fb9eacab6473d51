"""W&B, for real in offline mode: the run's own transaction log is read back."""
from __future__ import annotations

import signal
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from helpers import children, job_env, metrics, run_train, send_when_step, start_train, summary, wait_for
from wandb_records import records, run_files, summarize
from mnist_dist.wandb_mirror import resolve_mode


def test_offline_run_logs_config_metrics_images_and_summary(tiny_data, tmp_path):
    run = tmp_path / "run"
    res = run_train(
        1, tiny_data, run, "--epochs", "2", "--log-every", "4", "--wandb", "offline", "--wandb-tags", "a,b",
        "--wandb-log-model", env=job_env(WANDB_MODE="", WANDB_API_KEY="secret-key-123"),
    )
    assert res.returncode == 0, res.stderr
    assert "W&B offline run in" in res.stdout and "wandb sync" in res.stdout
    [log] = run_files(run)
    got = summarize(log)
    assert got["config"]["batch_size"] == 64 and got["config"]["model"] == "mlp" and got["config"]["epochs"] == 2
    steps = [h for h in got["history"] if "train_loss" in h]
    assert [h["step"] for h in steps] == [r["step"] for r in metrics(run) if "train_loss" in r]
    evals = [h for h in got["history"] if "test_acc" in h]
    assert len(evals) == 2 and "per_class_acc/9" in evals[0]
    images = [h for h in got["history"] if "predictions/_type" in h]
    assert len(images) == 2 and images[0]["predictions/_type"] == "image-file"
    assert images[0]["confusion_matrix/_type"] == "image-file" and images[0]["step"] == evals[0]["step"]
    assert images[0]["confusion_matrix_chart_table/_type"] == "table-file"
    media = log.parent / "files"
    assert (media / images[1]["predictions/path"]).stat().st_size > 5000
    assert got["summary"]["test_acc"] == summary(run)["test_acc"]
    models = [
        r.artifact for r in records(log) if r.WhichOneof("record_type") == "artifact" and r.artifact.type == "model"
    ]
    assert len(models) == 1 and models[0].name.startswith("model-"), "--wandb-log-model uploads the best checkpoint"
    leaked = [p for p in run.rglob("*") if p.is_file() and b"secret-key-123" in p.read_bytes()]
    assert not leaked, f"the API key was written to {leaked}"


def test_resumed_run_continues_the_same_wandb_run(medium_data, tmp_path):
    """SIGTERM to the whole process group, as Slurm and torchrun send it: the W&B process outlives the
    signal, mirrors every step up to the checkpoint and closes the run; the resumed job continues it."""
    run = tmp_path / "run"
    flags = ("--epochs", "2", "--batch-size", "8", "--log-every", "10", "--wandb", "offline")
    proc = start_train(1, medium_data, run, *flags)
    send_when_step(proc, run, signal.SIGTERM, 100, group=True)
    proc.communicate(timeout=60)
    assert proc.returncode == 75
    [first] = run_files(run)
    stopped = summarize(first)
    assert [h["step"] for h in stopped["history"] if "train_loss" in h] == [
        r["step"] for r in metrics(run) if "train_loss" in r]
    assert stopped["exit_code"] == 0
    res = run_train(1, medium_data, run, *flags)
    assert res.returncode == 0, res.stderr
    first, second = run_files(run)
    assert summarize(first)["run_id"] == summarize(second)["run_id"]
    assert [h["step"] for h in summarize(second)["history"] if "train_loss" in h][-1] == 2048


def test_a_killed_job_leaves_its_wandb_run_closed_as_failed(medium_data, tmp_path):
    """kill -9 of the training process: W&B keeps what was logged and marks the run failed (not running)."""
    run = tmp_path / "run"
    proc = start_train(1, medium_data, run, "--epochs", "2", "--batch-size", "8", "--log-every", "10",
                       "--wandb", "offline")
    wait_for(lambda: run_files(run) and any(r.get("step", 0) >= 100 for r in metrics(run)), what="step 100")
    [mirror] = children(proc)
    proc.kill()
    proc.wait()
    wait_for(lambda: not Path(f"/proc/{mirror}").exists(), what="the W&B process to end")
    got = summarize(run_files(run)[0])
    assert got["exit_code"] == 1
    assert [h["step"] for h in got["history"] if "train_loss" in h][:10] == list(range(10, 101, 10))


def test_unreachable_wandb_server_keeps_the_run_offline(medium_data, tmp_path):
    """Online mode with a key but no server: the W&B process switches to offline for the same run id
    and keeps config, metrics, pictures and summary; one line says how to upload it; the command waits
    for W&B no longer than WANDB_INIT_TIMEOUT."""
    run = tmp_path / "run"
    env = job_env(WANDB_MODE="", WANDB_API_KEY="x" * 40, WANDB_BASE_URL="http://127.0.0.1:9", WANDB_INIT_TIMEOUT="6")
    start = time.monotonic()  # 8 epochs of 2048 steps: training outlasts W&B's online attempt
    res = run_train(
        1, medium_data, run, "--epochs", "8", "--batch-size", "4", "--wandb", "online", env=env, timeout=180
    )
    wall = time.monotonic() - start
    assert res.returncode == 0, res.stderr
    warned = [line for line in res.stderr.splitlines() if "W&B could not start online" in line]
    assert len(warned) == 1 and "wandb sync " + str(run / "wandb") in warned[0], res.stderr
    [log] = run_files(run)
    got = summarize(log)
    assert got["config"]["epochs"] == 8 and got["summary"]["test_acc"] == summary(run)["test_acc"]
    assert [h["step"] for h in got["history"] if "train_loss" in h] == [
        r["step"] for r in metrics(run) if "train_loss" in r
    ]
    assert len([h for h in got["history"] if "predictions/_type" in h]) == 8
    assert wall < summary(run)["total_seconds"] + 6 + 10, f"the command took {wall:.0f} s"


@pytest.mark.parametrize("choice, env, want", [
    ("auto", {"WANDB_MODE": "offline"}, "offline"),
    ("auto", {"WANDB_API_KEY": "k"}, "online"),
    ("auto", {"NETRC": "/nonexistent"}, "offline"),
    ("disabled", {"WANDB_API_KEY": "k"}, "disabled"),
])
def test_auto_mode(choice, env, want):
    assert resolve_mode(choice, env) == want


def test_many_ranks_are_summarised_and_a_diagnosis_alerts_only_online():
    """Past 16 ranks a per-rank list is logged as min / median / max / max_rank, not 20 series; a straggler
    or communication-bound line becomes a wandb.alert on an online run (no server here: the run that
    receives them is a recorder; W&B's own AlertLevel), and only the record on an offline one."""
    import wandb

    from mnist_dist.wandb_mirror import Mirror

    logged, alerts = [], []
    run = SimpleNamespace(offline=False, log=logged.append, alert=lambda **kw: alerts.append(kw))
    mirror = Mirror(wandb, plots=None)
    mirror.run = run
    mirror.log({"step": 5, "rank_compute_s": [0.1] * 3 + [0.5] + [0.1] * 16, "rank_wait_s": [0.2, 0.3]})
    assert logged == [{"step": 5, "rank_compute_s/min": 0.1, "rank_compute_s/median": 0.1,
                       "rank_compute_s/max": 0.5, "rank_compute_s/max_rank": 3,
                       "rank_wait_s/0": 0.2, "rank_wait_s/1": 0.3}]
    line = {"title": "straggler", "text": "rank 3 on node7 is 5.0x slower than the median rank", "level": "warning"}
    mirror.alert(line)
    assert alerts == [{"title": "straggler", "text": line["text"], "level": wandb.AlertLevel.WARN}]
    run.offline = True
    mirror.alert(line)
    assert len(alerts) == 1
