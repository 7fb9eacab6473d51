"""The W&B mirror of metrics.jsonl, on rank 0 only. wandb is imported only when a run uses it.

Any W&B problem (not installed, no network, init timeout, quota) warns once and turns the mirror off;
training and metrics.jsonl go on. A resumed run passes the run id saved in its checkpoint, so the
curves continue in the same W&B run.
"""
from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from .config import Config
from .tracking import say, warn


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
    try:
        if netrc.netrc(environ.get("NETRC")).authenticators(host):
            return "online"
    except (OSError, netrc.NetrcParseError):
        pass
    return "offline"


class WandbMirror:
    def __init__(self, run: Any, wandb: Any, cfg: Config):
        self.run, self.wandb, self.cfg = run, wandb, cfg
        self.run_id = run.id

    def _guard(self, what: str, fn, *args) -> None:
        if self.run is None:
            return
        try:
            fn(*args)
        except Exception as err:  # never let the dashboard stop training
            warn(f"W&B {what} failed ({type(err).__name__}: {err}); W&B is off for the rest of this run")
            self.run = None

    def log(self, record: dict) -> None:
        flat = {}
        for key, value in record.items():
            if isinstance(value, list):
                flat.update({f"{key}/{i}": v for i, v in enumerate(value)})
            else:
                flat[key] = value
        self._guard("log", self.run.log, flat)

    def figures(self, step: int, payload: dict) -> None:
        self._guard("image upload", self._figures, step, payload)

    def _figures(self, step: int, payload: dict) -> None:
        from . import plots

        result, images, labels = payload["eval"], payload["images"], payload["labels"]
        n = min(40, len(labels))
        grid = plots.prediction_grid(images[:n], result.predictions[:n], labels[:n], title=f"step {step}")
        self.run.log({
            "step": step,
            "predictions": self.wandb.Image(plots.to_image(grid), caption="predicted / true (red: wrong)"),
            "confusion_matrix": self.wandb.Image(plots.to_image(plots.confusion_matrix(result.confusion))),
            "confusion_matrix_chart": self.wandb.plot.confusion_matrix(
                y_true=labels.cpu().tolist(), preds=result.predictions.tolist(), class_names=[str(d) for d in range(10)]),
        })

    def finish(self, summary: dict | None, best_checkpoint: Path | None) -> None:
        if summary:
            self._guard("summary", self.run.summary.update if self.run else None,
                        {k: v for k, v in summary.items() if not isinstance(v, list)})
        if summary and self.cfg.wandb_log_model and best_checkpoint and best_checkpoint.exists():
            self._guard("model upload", self._log_model, best_checkpoint)
        self._guard("finish", self.run.finish if self.run else None)

    def _log_model(self, path: Path) -> None:
        artifact = self.wandb.Artifact(f"model-{self.run_id}", type="model", metadata={"model": self.cfg.model})
        artifact.add_file(str(path), name="best.pt")
        self.run.log_artifact(artifact, aliases=["best", "latest"])


def start_wandb(cfg: Config, run_dir: Path, run_id: str | None) -> WandbMirror | None:
    mode = resolve_mode(cfg.wandb)
    if mode == "disabled":
        return None
    try:
        import wandb

        run = wandb.init(
            project=cfg.wandb_project, entity=cfg.wandb_entity or None, group=cfg.wandb_group or None,
            tags=[t for t in cfg.wandb_tags.split(",") if t] or None, name=cfg.wandb_name or run_dir.resolve().name,
            id=run_id, resume="allow", mode=mode, dir=str(run_dir),
            config=cfg.to_dict(),
            settings=wandb.Settings(init_timeout=float(os.environ.get("WANDB_INIT_TIMEOUT", 60)), console="off",
                                    silent=True),
        )
        run.define_metric("step")
        run.define_metric("*", step_metric="step")  # x axis = training step; resumed steps may repeat
    except Exception as err:
        warn(f"W&B is off for this run ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
             f"metrics.jsonl is still written")
        return None
    if mode == "offline":
        say(f"W&B offline run in {Path(run.dir).parent}; upload it with: wandb sync {Path(run.dir).parent}")
    return WandbMirror(run, wandb, cfg)
