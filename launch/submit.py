"""Submit mnist-dist training to Slurm with submitit (or run it here with --local).

    python launch/submit.py --nodes 2 --gpus-per-node 4 --partition gpu --time 60 -- --epochs 10 --data-dir DIR
    python launch/submit.py --ntasks-per-node 2 --local -- --data-dir DIR
    python launch/submit.py --nodes 2 --doctor --wait -- --data-dir DIR --run-dir RUN   # check the nodes first

Everything after `--` is a `mnist-dist train` flag. Prints the job id, the log paths, the run dir and
where W&B puts the run; --wait waits and prints the summary.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from mnist_dist.config import parse_config  # noqa: E402
from mnist_dist.errors import UsageError, print_error  # noqa: E402
from mnist_dist.slurm_job import DoctorJob, TrainJob  # noqa: E402


def launcher_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=0, help="one rank per GPU")
    p.add_argument("--ntasks-per-node", type=int, default=0, help="ranks per node (default: GPUs per node, or 1)")
    p.add_argument("--cpus-per-task", type=int, default=1)
    p.add_argument("--mem-gb", type=float, default=None)
    p.add_argument("--time", type=int, default=60, help="minutes")
    p.add_argument("--partition", default=None)
    p.add_argument("--account", default=None)
    p.add_argument("--qos", default=None)
    p.add_argument("--signal-delay-s", type=int, default=90, help="USR2 this long before the time limit")
    p.add_argument("--folder", default="runs/submitit/%j", help="submitit's logs and pickles")
    p.add_argument("--name", default="mnist-dist")
    p.add_argument("--local", action="store_true", help="run here with submitit's local executor, no Slurm")
    p.add_argument("--wait", action="store_true", help="wait for the job and print its summary")
    return p


def make_executor(args: argparse.Namespace):
    import submitit

    executor = submitit.AutoExecutor(folder=args.folder, cluster="local" if args.local else None)
    tasks = args.ntasks_per_node or args.gpus_per_node or 1
    params = dict(name=args.name, nodes=args.nodes, tasks_per_node=tasks, cpus_per_task=args.cpus_per_task,
                  timeout_min=args.time)
    if args.gpus_per_node:
        params["gpus_per_node"] = args.gpus_per_node
    if args.mem_gb:
        params["mem_gb"] = args.mem_gb
    slurm = {"slurm_partition": args.partition, "slurm_account": args.account, "slurm_qos": args.qos}
    params.update({k: v for k, v in slurm.items() if v})
    if executor.cluster == "slurm":
        params["slurm_signal_delay_s"] = args.signal_delay_s
        # a task that fails ends the step: the others would otherwise wait in a collective (NCCL: 10 min)
        params["slurm_srun_args"] = ["--kill-on-bad-exit=1"]
        params["slurm_additional_parameters"] = {"open-mode": "append"}
    executor.update_parameters(**params)
    return executor


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def world_size(args: argparse.Namespace) -> int:
    return args.nodes * (args.ntasks_per_node or args.gpus_per_node or 1)


def checked_config(train_argv: list[str], args: argparse.Namespace):
    """Bad train flags fail here, before anything is queued."""
    if args.gpus_per_node and args.ntasks_per_node > args.gpus_per_node:
        raise UsageError(f"--ntasks-per-node {args.ntasks_per_node} is more than --gpus-per-node "
                         f"{args.gpus_per_node}: ranks would share a GPU; use one rank per GPU")
    cfg = parse_config(train_argv)
    cfg.validate(world_size(args))
    return cfg


def main(argv: list[str] | None = None) -> int:
    ours, train_argv = split_argv(sys.argv[1:] if argv is None else argv)
    parser = launcher_parser(__doc__)
    parser.add_argument("--doctor", action="store_true", help="run `mnist-dist doctor` on the same tasks and dirs "
                        "instead of training (with --wait: its report; exit 1 on a problem)")
    args = parser.parse_args(ours)
    try:
        cfg = checked_config(train_argv, args)
    except UsageError as err:
        print_error(err)
        return err.exit_code
    job = make_executor(args).submit((DoctorJob if args.doctor else TrainJob)(train_argv))
    print(f"submitted job {job.job_id}\n  stdout {job.paths.stdout}\n  stderr {job.paths.stderr}\n"
          f"  run dir {Path(cfg.run_dir).resolve()}\n  W&B: mode {cfg.wandb}, project {cfg.wandb_project} "
          f"(offline runs land in {Path(cfg.run_dir).resolve() / 'wandb'})", flush=True)
    if args.wait:
        results = job.results()
        print(json.dumps(results[0], indent=2))
        if args.doctor:  # its table and lines are in the job's log (rank 0's)
            print(Path(job.paths.stdout).read_text(), end="")
            print(Path(job.paths.stderr).read_text(), end="", file=sys.stderr)
            return max(r["doctor_exit_code"] for r in results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
