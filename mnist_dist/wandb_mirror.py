"""The W&B mirror of metrics.jsonl: a child process of rank 0 that does everything W&B.

Rank 0 starts it first thing (`MirrorProcess`), so importing wandb and matplotlib and starting the W&B
run overlap rank 0's own start-up, and drawing the pictures after each evaluation overlaps the next
epoch instead of holding up training. Rank 0 writes one JSON object a line to the child's stdin:

    {"init": {"config", "run_dir", "run_id", "mode"}}  {"log": record}  {"figures": {...}}  {"alert": {...}}
    {"finish": {...}}

A resumed run passes the run id saved in its checkpoint, so the curves continue in the same W&B run.
Any W&B problem (not installed, no network, init timeout, quota) warns once and ends the child;
training and metrics.jsonl go on. The child ignores the stop signals that launchers send to a whole
process group (rank 0 checkpoints, then closes the pipe, and the child finishes the run); the pipe
closing without "finish" means rank 0 died, and the W&B run is marked failed.

This module imports neither torch nor (in rank 0) wandb.
"""
from __future__ import annotations

import base64
import contextlib
import json
import netrc
import os
import queue
import secrets
import signal
import statistics
import string
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import urlparse

from .errors import first_line, warn
from .signals import STOP_SIGNALS

MANY_RANKS = 16  # per-rank lists longer than this are logged as min / median / max, not a series per rank


def wait_limit_s() -> float:
    """How long W&B may take to start, and rank 0 waits for it to finish at the end: W&B's own
    WANDB_INIT_TIMEOUT, 60 s by default."""
    try:
        return float(os.environ.get("WANDB_INIT_TIMEOUT", 60))
    except ValueError:
        return 60.0

# the child finds this package even where it is not installed (appended: never shadows the stdlib)
CHILD = (f"import sys; sys.path.append({str(Path(__file__).resolve().parent.parent)!r}); "
         f"from mnist_dist.wandb_mirror import serve; serve(sys.stdin.buffer)")


def resolve_mode(choice: str, environ=os.environ) -> str:
    """auto: WANDB_MODE if set, else online when logged in (WANDB_API_KEY or ~/.netrc), else offline."""
    if choice != "auto":
        return choice
    env_mode = environ.get("WANDB_MODE", "").lower()
    if env_mode:
        return {"dryrun": "offline", "run": "online"}.get(env_mode, env_mode)
    if environ.get("WANDB_API_KEY"):
        return "online"
    host = urlparse(environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    with contextlib.suppress(OSError, netrc.NetrcParseError):  # no readable ~/.netrc: not logged in
        if netrc.netrc(environ.get("NETRC")).authenticators(host):
            return "online"
    return "offline"


def new_run_id() -> str:
    """A W&B-style run id (8 of [a-z0-9]); rank 0 makes it, so checkpoints can carry it from the start."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


# --- rank 0's end ---------------------------------------------------------------------------------

class MirrorProcess:
    """Starts the child and feeds it. `send` never blocks training: a thread writes to the pipe."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE)
        self.lines: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self.started = False
        self.writer = threading.Thread(target=self._write, name="wandb-mirror-pipe", daemon=True)
        self.writer.start()

    def send(self, kind: str, payload) -> None:
        self.started |= kind == "init"
        if self.writer.is_alive():  # else the child has gone
            self.lines.put(json.dumps({kind: payload}).encode() + b"\n")

    def _write(self) -> None:
        with contextlib.suppress(OSError), self.proc.stdin:  # OSError: the child has gone (it said why)
            while (line := self.lines.get()) is not None:
                self.proc.stdin.write(line)
                self.proc.stdin.flush()

    def close(self, finish: dict) -> None:
        """Let the child finish the W&B run with `finish` (or stop it at once if no run was started)."""
        if self.started:
            self.send("finish", finish)
        else:
            self.proc.kill()
        self.lines.put(None)
        try:
            self.proc.wait(wait_limit_s())
        except subprocess.TimeoutExpired:
            warn(f"W&B did not finish within {wait_limit_s():g} s (WANDB_INIT_TIMEOUT); stopped it (offline files, "
                 f"if any, are in the run dir's wandb/ folder)")
            self.proc.kill()
            self.proc.wait()
            return
        if self.started and self.proc.returncode != 0:  # it warns itself about every error it can catch
            warn(f"the W&B mirror process died (exit code {self.proc.returncode}); metrics.jsonl is whole")


# --- the child ------------------------------------------------------------------------------------

class Mirror:
    """One W&B run, fed by the messages; any failure warns once and ends the mirror."""

    def __init__(self, wandb, plots):
        self.wandb, self.plots, self.run, self.cfg = wandb, plots, None, {}
        self.grid = self.confusion = None  # the two figures, kept and refilled after every evaluation

    def init(self, msg: dict) -> None:
        try:
            self.run = self.start(msg, msg["mode"])
        except Exception as err:  # no network, wrong key, server down, time-out: keep it all offline
            if msg["mode"] != "online":
                raise
            self.wandb.teardown()  # a fresh W&B service: the failed attempt still holds the run id
            self.wandb.setup()
            self.run = self.start(msg, "offline")
            where = Path(self.run.dir).parent
            warn(f"W&B could not start online ({type(err).__name__}: {first_line(err)}); the run is kept offline "
                 f"with the same id: upload it later with: wandb sync {where}")
        else:
            if msg["mode"] == "offline":
                where = Path(self.run.dir).parent
                print(f"W&B offline run in {where}; upload it with: wandb sync {where}", flush=True)
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")  # x axis = training step; resumed steps may repeat

    def start(self, msg: dict, mode: str):
        cfg = self.cfg = msg["config"]
        return self.wandb.init(
            project=cfg["wandb_project"], entity=cfg["wandb_entity"] or None, group=cfg["wandb_group"] or None,
            tags=[t for t in cfg["wandb_tags"].split(",") if t] or None,
            name=cfg["wandb_name"] or Path(msg["run_dir"]).resolve().name,
            id=msg["run_id"], resume="allow", mode=mode, dir=msg["run_dir"], config=cfg,
            # online gets 80 % of the limit: if it fails, the offline run still starts, catches up and
            # finishes within the limit that rank 0 waits for it after a short training
            settings=self.wandb.Settings(init_timeout=wait_limit_s() * (0.8 if mode == "online" else 1.0),
                                         console="off", silent=True),
        )

    def log(self, record: dict) -> None:
        """A metrics.jsonl record; a list (per class, per rank) as one series per entry, or, past
        MANY_RANKS entries, as its min, median, max and the rank of the max."""
        flat = {}
        for key, value in record.items():
            if isinstance(value, list) and len(value) > MANY_RANKS:
                top = max(range(len(value)), key=value.__getitem__)
                flat.update({f"{key}/min": min(value), f"{key}/median": statistics.median(value),
                             f"{key}/max": value[top], f"{key}/max_rank": top})
            elif isinstance(value, list):
                flat.update({f"{key}/{i}": v for i, v in enumerate(value)})
            else:
                flat[key] = value
        self.run.log(flat)

    def alert(self, msg: dict) -> None:
        """A diagnosis as a W&B alert (e-mail, Slack), where the run is online; its record is logged too."""
        if not self.run.offline:
            level = self.wandb.AlertLevel.WARN if msg["level"] == "warning" else self.wandb.AlertLevel.INFO
            self.run.alert(title=msg["title"], text=msg["text"], level=level)

    def figures(self, msg: dict) -> None:
        """The prediction grid and confusion matrix as images, and W&B's interactive confusion matrix."""
        import numpy as np

        def unpack(text: str):
            return np.frombuffer(base64.b64decode(text), dtype=np.uint8)

        plots, step = self.plots, msg["step"]
        preds, labels = unpack(msg["predictions"]), unpack(msg["labels"])
        pixels = unpack(msg["pixels"]).reshape(-1, 28, 28) / 255
        n = len(pixels)
        if self.grid is None:  # the same test images every time: built once, then refilled (cheaper than anew)
            self.grid = plots.prediction_grid(pixels, preds[:n], labels[:n])
            self.confusion = plots.confusion_matrix(msg["confusion"])
        plots.recaption_grid(self.grid, preds[:n], labels[:n], title=f"step {step}")
        plots.refill_confusion_matrix(self.confusion, msg["confusion"])
        self.run.log({
            "step": step,
            "predictions": self.wandb.Image(plots.to_image(self.grid), caption="predicted / true (red: wrong)"),
            "confusion_matrix": self.wandb.Image(plots.to_image(self.confusion)),
            "confusion_matrix_chart": self.wandb.plot.confusion_matrix(
                y_true=labels.tolist(), preds=preds.tolist(), class_names=[str(d) for d in range(10)]),
        })

    def finish(self, msg: dict) -> None:
        summary, best = msg["summary"], msg["best_checkpoint"]
        if summary:
            self.run.summary.update({k: v for k, v in summary.items() if not isinstance(v, list)})
        if summary and self.cfg["wandb_log_model"] and best and Path(best).exists():
            artifact = self.wandb.Artifact(f"model-{self.run.id}", type="model", metadata={"model": self.cfg["model"]})
            artifact.add_file(best, name="best.pt")
            self.run.log_artifact(artifact, aliases=["best", "latest"])
        self.run.finish()
        self.run = None


def serve(lines) -> None:
    for sig in (signal.SIGINT, *STOP_SIGNALS):
        signal.signal(sig, signal.SIG_IGN)  # rank 0 decides when the run ends
    kind = "start-up"
    try:
        import wandb  # the slow imports, done while rank 0 imports torch and loads the data

        from . import plots

        wandb.setup()  # starts W&B's service process now: init then takes a fraction of the time
        mirror = Mirror(wandb, plots)
        for line in lines:
            [(kind, msg)] = json.loads(line).items()
            getattr(mirror, kind)(msg)
            if kind == "finish":
                return
        kind = "finish"
        if mirror.run is not None:  # rank 0 died without saying goodbye
            mirror.run.finish(exit_code=1)
    except Exception as err:  # never let the dashboard stop training
        warn(f"W&B is off for this run ({kind} failed: {type(err).__name__}: {first_line(err)}); metrics.jsonl is "
             f"still written")
