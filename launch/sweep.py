"""A hyperparameter sweep with submitit: one Slurm job (an array task) per grid point.

    python launch/sweep.py --grid lr=1e-3,3e-3 hidden=64,128,256 --sweep-dir runs/sweep1 -- --epochs 4 --data-dir DIR
    mnist-dist sweep-report runs/sweep1

Launcher flags are those of launch/submit.py (--partition, --time, --local, ...); after `--` come
`mnist-dist train` flags shared by every point. Each point trains in SWEEP_DIR/NAME=VALUE,... and
logs to the W&B group named after the sweep dir.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))

from submit import checked_config, launcher_parser, make_executor, split_argv  # noqa: E402

from mnist_dist.errors import UsageError, print_error  # noqa: E402
from mnist_dist.slurm_job import TrainJob  # noqa: E402
from mnist_dist.sweep import expand, point_flags, point_name  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ours, shared = split_argv(sys.argv[1:] if argv is None else argv)
    parser = launcher_parser(__doc__)
    parser.add_argument("--grid", nargs="+", required=True, metavar="NAME=V1,V2")
    parser.add_argument("--sweep-dir", default="runs/sweep")
    args = parser.parse_args(ours)
    sweep_dir = Path(args.sweep_dir).resolve()
    try:
        jobs_argv = [
            [*shared, *point_flags(p), "--run-dir", str(sweep_dir / point_name(p)), "--wandb-group", sweep_dir.name]
            for p in expand(args.grid)
        ]
        for argv_ in jobs_argv:
            checked_config(argv_, args)
    except UsageError as err:
        print_error(err)
        return err.exit_code
    executor = make_executor(args)
    with executor.batch():  # one Slurm job array
        jobs = [executor.submit(TrainJob(a)) for a in jobs_argv]
    for job, argv_ in zip(jobs, jobs_argv, strict=True):
        print(f"job {job.job_id}: {argv_[argv_.index('--run-dir') + 1]}")
    if args.wait:
        for job in jobs:
            job.results()
        from mnist_dist.sweep import table

        print(table(str(sweep_dir)))
    else:
        print(f"when they finish: mnist-dist sweep-report {sweep_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
