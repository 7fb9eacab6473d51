"""Per-rank profiles of chosen training steps, on request.

    mnist-dist train --profile-steps 5-8 [--profile-ranks 0,1]

records torch.profiler traces of steps 5 to 8 (counted from 1 over the whole run), one Chrome/Perfetto
trace per profiled rank at RUN_DIR/profile/rank-<r>.json (open it in https://ui.perfetto.dev or
chrome://tracing), and rank 0 prints the ten operators that took the most time of their own. Off by
default; then the loop only checks that there is no profiler.
"""
from __future__ import annotations

import os
from pathlib import Path
from collections.abc import Callable

import torch

from .config import Config, rank_list, step_range
from .distributed import DistEnv
from .errors import UsageError


class StepProfiler:
    """Starts torch.profiler before the first chosen step and writes the trace after the last one."""

    def __init__(self, first: int, last: int, path: Path, device: torch.device, say: Callable[..., None], table: bool):
        self.first, self.last, self.path, self.say, self.table = first, last, path, say, table
        os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # the profiler's own chatter on stderr: errors only
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.prof = torch.profiler.profile(activities=activities, record_shapes=True)
        self.running = False

    @classmethod
    def wanted(cls, cfg: Config, env: DistEnv, total_steps: int, device: torch.device,
               say: Callable[..., None]) -> StepProfiler | None:
        """This rank's profiler, if --profile-steps asks for one here; every rank checks the range alike."""
        steps = step_range(cfg.profile_steps)
        if steps is None:
            return None
        if steps[1] > total_steps:
            raise UsageError(f"--profile-steps {cfg.profile_steps} is outside the run: it has steps 1 to "
                             f"{total_steps}", everywhere=True)
        ranks = rank_list(cfg.profile_ranks)
        if ranks is not None and env.rank not in ranks:
            return None
        path = Path(cfg.run_dir) / "profile" / f"rank-{env.rank}.json"
        return cls(*steps, path, device, say, table=env.is_main)

    def before(self, step: int) -> None:
        if not self.running and self.first <= step <= self.last:
            self.prof.start()
            self.running = True

    def after(self, step: int) -> None:
        if self.running and step >= self.last:
            self.prof.stop()
            self.running = False
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.prof.export_chrome_trace(str(self.path))
            if self.table:
                averages = self.prof.key_averages()
                self.say(
                    f"profile of steps {self.first}-{self.last} in {self.path.parent}; the operators by self time:\n"
                    + averages.table(sort_by="self_cpu_time_total", row_limit=10)
                )
