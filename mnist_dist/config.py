"""One dataclass holds every setting of a training run; each field is a command-line flag.

Used by `mnist-dist train`, `python -m mnist_dist.train` and the Slurm/submitit launchers:
`parse_config(argv)` turns flags (and an optional `--config FILE.toml`) into a validated `Config`.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import tomllib
from dataclasses import dataclass, field, fields
from typing import Any

from .errors import UsageError


@dataclass
class Config:
    # data and outputs
    data_dir: str = field(default="./data", metadata={"help": "MNIST root (holds MNIST/raw); env MNIST_DATA_DIR"})
    run_dir: str = field(default="runs/default", metadata={"help": "where config, metrics, checkpoints and summary go"})
    download: bool = field(default=True, metadata={"help": "download MNIST if missing (local rank 0 only)"})
    verify_data: bool = field(
        default=True,
        metadata={
            "help": "check the raw files against the official SHA-256 pins (turn off only for your own IDX files)"
        },
    )
    # model and optimisation
    model: str = field(default="mlp", metadata={"help": "mlp (784-H-10) or cnn", "choices": ["mlp", "cnn"]})
    hidden: int = field(default=128, metadata={"help": "hidden units of the MLP"})
    epochs: int = field(default=4, metadata={"help": "passes over the 60,000 training images"})
    batch_size: int = field(default=64, metadata={"help": "GLOBAL batch; each rank takes batch_size / world_size"})
    lr: float = field(default=1e-3, metadata={"help": "Adam learning rate"})
    lr_decay: float = field(
        default=0.7, metadata={"help": "multiply the learning rate by this after every epoch (1: constant)"}
    )
    seed: int = field(default=0, metadata={"help": "seeds the initial weights and the sampler's shuffle"})
    device: str = field(
        default="auto", metadata={"help": "auto (cuda if available), cpu or cuda", "choices": ["auto", "cpu", "cuda"]}
    )
    deterministic: bool = field(
        default=True,
        metadata={
            "help": ("deterministic GPU kernels (cuDNN, cuBLAS), so a resumed run equals an uninterrupted one "
                      "bit for bit on GPUs too; --no-deterministic trades that for speed (the CPU is "
                      "deterministic either way)")
        },
    )
    exact: bool = field(
        default=False,
        metadata={"help": "the same model bit for bit from any number of ranks that divides --pieces (exact.py)"},
    )
    pieces: int = field(
        default=4,
        metadata={
            "help": ("with --exact: the fixed pieces each global batch is cut into (a power of two dividing "
                      "--batch-size), so the most ranks it serves; more cost more time per process")
        },
    )
    cpu_allreduce: str = field(
        default="auto",
        metadata={
            "help": ("how CPU ranks average gradients: shm (shared memory, all ranks on one host), gloo, or auto "
                      "(shm when possible)"),
            "choices": ["auto", "shm", "gloo"],
        },
    )
    grad_compression: str = field(
        default="none",
        metadata={
            "help": ("fewer bytes per step for slow links (compression.py): fp16 or bf16 casts, or powersgd (low-rank, "
                     "with error feedback); not with --exact, which keeps the gradients' bits"),
            "choices": ["none", "fp16", "bf16", "powersgd"],
        },
    )
    powersgd_rank: int = field(
        default=2, metadata={"help": "with --grad-compression powersgd: the rank of each matrix's approximation"}
    )
    powersgd_start: int = field(
        default=400,
        metadata={"help": "with --grad-compression powersgd: plain all_reduce before this step (at least 2)"},
    )
    # logging and checkpoints
    log_every: int = field(
        default=50, metadata={"help": "steps between metrics.jsonl records (also when ranks agree on stop signals)"}
    )
    ckpt_every: int = field(default=0, metadata={"help": "steps between checkpoints (0: only at epoch ends)"})
    keep_last: int = field(
        default=3, metadata={"help": "how many recent checkpoints to keep (the best is kept as well)"}
    )
    resume: str = field(
        default="auto", metadata={"help": "auto (newest valid checkpoint in run dir), never, or a checkpoint path"}
    )
    overwrite: bool = field(
        default=False, metadata={"help": "with --resume never: start over in a run dir that holds checkpoints"}
    )
    progress: str = field(
        default="auto",
        metadata={
            "help": ("progress within an epoch on rank 0: bar (tqdm), lines (plain, rate-limited, for logs), off, "
                     "or auto (a bar on a terminal, lines elsewhere)"),
            "choices": ["auto", "bar", "lines", "off"],
        },
    )
    straggler_factor: float = field(
        default=1.5,
        metadata={
            "help": ("name a rank whose compute per step is this many times the median rank's, for 2 log intervals "
                     "running; also say when the gradient exchange is what every rank waits for (0: off, and no "
                     "per-rank timing)")
        },
    )
    profile_steps: str = field(
        default="",
        metadata={
            "help": "A-B: record torch.profiler traces of steps A to B (from 1) in RUN_DIR/profile/, one per rank"
        },
    )
    profile_ranks: str = field(
        default="", metadata={"help": "with --profile-steps: the ranks to profile, e.g. 0,1 (default: all)"}
    )
    hang_timeout: float = field(
        default=300.0,
        metadata={
            "help": ("seconds without progress on any rank, once training has started, after which every rank "
                      "stops with exit code 76 (0: off); before the first step --start-timeout applies")
        },
    )
    start_timeout: float = field(
        default=600.0,
        metadata={
            "help": ("seconds the process group may take to form (every rank started and connected) before every "
                      "rank stops in one line naming the ranks never seen (exit 1)")
        },
    )
    # Weights & Biases (rank 0 only)
    wandb: str = field(
        default="auto",
        metadata={
            "help": "auto, online, offline or disabled (env WANDB_MODE wins over auto)",
            "choices": ["auto", "online", "offline", "disabled"],
        },
    )
    wandb_project: str = field(default="mnist-dist", metadata={"help": "W&B project"})
    wandb_entity: str = field(default="", metadata={"help": "W&B entity (team or user)"})
    wandb_group: str = field(default="", metadata={"help": "W&B group, e.g. a sweep name"})
    wandb_tags: str = field(default="", metadata={"help": "comma-separated W&B tags"})
    wandb_name: str = field(default="", metadata={"help": "W&B run name (default: the run dir's name)"})
    wandb_log_model: bool = field(
        default=False, metadata={"help": "upload the best checkpoint as a W&B artifact at the end"}
    )

    def validate(self, world_size: int = 1) -> None:
        """Check invariants early, with messages a user understands."""
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise UsageError(f"--{flag(f.name)} must be one of {', '.join(choices)}, got {getattr(self, f.name)!r}")
        for name in ("epochs", "batch_size", "hidden", "log_every", "keep_last", "pieces"):
            if getattr(self, name) <= 0:
                raise UsageError(f"--{flag(name)} must be positive, got {getattr(self, name)}")
        for name in ("lr", "lr_decay"):
            value = getattr(self, name)
            if not 0 < value < float("inf"):
                raise UsageError(f"--{flag(name)} must be a positive number, got {value}")
        if not (self.straggler_factor == 0 or 1 < self.straggler_factor < float("inf")):
            raise UsageError(f"--straggler-factor must be 0 (off) or a number above 1, got {self.straggler_factor}")
        if self.ckpt_every < 0:
            raise UsageError(f"--ckpt-every must be >= 0, got {self.ckpt_every}")
        if not 0 <= self.hang_timeout < float("inf") or 0 < self.hang_timeout < 1:
            raise UsageError(f"--hang-timeout must be 0 (off) or at least 1 second, got {self.hang_timeout}")
        if not 1 <= self.start_timeout < float("inf"):
            raise UsageError(f"--start-timeout must be at least 1 second, got {self.start_timeout}")
        step_range(self.profile_steps)  # the format; the run's length is checked once the data is loaded
        rank_list(self.profile_ranks)
        if self.powersgd_rank < 1 or self.powersgd_start < 2:
            raise UsageError(f"--powersgd-rank must be at least 1 and --powersgd-start at least 2 (torch's PowerSGD "
                             f"needs two plain steps), got {self.powersgd_rank} and {self.powersgd_start}")
        if self.grad_compression != "none" and self.exact:
            raise UsageError(f"--grad-compression {self.grad_compression} changes the gradients' bits by design, and "
                             f"--exact keeps them: drop one of the two")
        if self.grad_compression != "none" and self.cpu_allreduce == "shm":
            raise UsageError(f"--grad-compression {self.grad_compression} runs over the process group, not shared "
                             f"memory: use --cpu-allreduce auto or gloo")
        if self.exact:
            self.validate_exact(world_size)
        if self.batch_size % world_size:
            raise UsageError(
                f"--batch-size {self.batch_size} is the global batch and must be divisible by the "
                f"world size {world_size} (each rank takes an equal share)"
            )

    def validate_exact(self, world_size: int) -> None:
        p = self.pieces
        if p & (p - 1) or self.batch_size % p:
            raise UsageError(f"--pieces must be a power of two that divides --batch-size {self.batch_size}, got {p}")
        if not self.deterministic:
            raise UsageError("--exact needs deterministic kernels: drop --no-deterministic")
        if p % world_size:
            *few, most = [str(w) for w in range(1, p + 1) if p % w == 0]
            works = f"{', '.join(few)} or {most}" if few else most
            raise UsageError(f"--exact cuts every global batch into {p} pieces, which {world_size} ranks cannot share "
                             f"evenly: start {works} ranks, or change --pieces")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def check_same_as(self, main: dict[str, Any], rank: int) -> None:
        """Every rank must train alike: refuse flags that differ from rank 0's config (`main`). Paths
        may differ (node-local disks): only rank 0 reads and writes the run dir."""
        differ = [f"--{flag(k)} {v} (rank 0: {main.get(k)})" for k, v in self.to_dict().items()
                  if k not in PER_NODE_FIELDS and v != main.get(k)]
        if differ:
            raise UsageError(f"rank {rank} was started with other flags than rank 0: {', '.join(differ)}; give "
                             f"every rank the same flags")


# Fields that shape the model or its training trajectory: a resumed run must match them.
TRAJECTORY_FIELDS = ("model", "hidden", "batch_size", "lr", "lr_decay", "seed", "exact", "pieces", "grad_compression",
                     "powersgd_rank", "powersgd_start")

# Fields that may differ between nodes: only rank 0 reads and writes the run dir and the checkpoints.
PER_NODE_FIELDS = ("data_dir", "run_dir", "resume")

# Defaults that differ by model (a flag, the config file or the environment still wins).
MODEL_DEFAULTS = {"mlp": {}, "cnn": {"epochs": 8, "lr_decay": 0.75}}


def flag(name: str) -> str:
    return name.replace("_", "-")


def step_range(text: str) -> tuple[int, int] | None:
    """'A-B' -> (A, B); '' -> None. Raises UsageError for anything else."""
    if not text:
        return None
    first, _, last = text.partition("-")
    try:
        a, b = int(first), int(last or first)
    except ValueError:
        raise UsageError(f"--profile-steps wants A-B (steps counted from 1), got {text!r}") from None
    if not 1 <= a <= b:
        raise UsageError(f"--profile-steps wants 1 <= A <= B, got {text!r}")
    return a, b


def rank_list(text: str) -> set[int] | None:
    """'0,1' -> {0, 1}; '' -> None (every rank)."""
    try:
        return {int(r) for r in text.split(",")} if text else None
    except ValueError:
        raise UsageError(f"--profile-ranks wants a comma-separated list of ranks, got {text!r}") from None


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="mnist-dist train", description="Train the MNIST classifier (DDP).")
    parser.add_argument("--config", metavar="FILE.toml", help="defaults for any flag below (flags win)")
    for f in fields(Config):
        help_ = f.metadata.get("help", "") + f" (default: {f.default})"
        if f.type == "bool":
            parser.add_argument(f"--{flag(f.name)}", action=argparse.BooleanOptionalAction, default=None, help=help_)
        else:
            kind = {"int": int, "float": float}.get(f.type, str)
            parser.add_argument(
                f"--{flag(f.name)}", type=kind, default=None, help=help_, choices=f.metadata.get("choices"),
                metavar=None if "choices" in f.metadata else f.name.upper(),
            )
    parser.add_argument(
        "--no-resume", dest="resume", action="store_const", const="never", help="same as --resume never"
    )
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    """Layer the config: dataclass defaults < the model's defaults < environment < --config FILE < flags."""
    chosen = {f.name: getattr(args, f.name) for f in fields(Config) if getattr(args, f.name, None) is not None}
    from_file = load_toml(args.config) if args.config else {}
    values: dict[str, Any] = dict(MODEL_DEFAULTS.get(chosen.get("model", from_file.get("model", "mlp")), {}))
    if os.environ.get("MNIST_DATA_DIR"):
        values["data_dir"] = os.environ["MNIST_DATA_DIR"]
    values.update(from_file)
    values.update(chosen)
    return Config(**values)


def load_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            raw = tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise UsageError(f"cannot read config file {path}: {err}") from None
    known = {f.name: f for f in fields(Config)}
    values = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in known:
            raise UsageError(f"config file {path}: unknown setting '{key}'")
        want = {"int": int, "float": (int, float), "bool": bool, "str": str}[known[name].type]
        if not isinstance(value, want) or (known[name].type == "int" and isinstance(value, bool)):
            raise UsageError(f"config file {path}: '{key}' should be {known[name].type}, got {value!r}")
        values[name] = float(value) if known[name].type == "float" else value
    return values


def parse_config(argv: list[str] | None = None) -> Config:
    return config_from_args(build_parser().parse_args(argv))
