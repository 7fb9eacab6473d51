"""`mnist-dist COMMAND ...`: train, download, evaluate, predict, export, report, sweep-report.

`mnist-dist train` takes exactly the flags of `python -m mnist_dist.train` (see `mnist-dist train -h`).
"""
from __future__ import annotations

import argparse
import sys

from .errors import UsageError, print_error

USAGE = """usage: mnist-dist COMMAND [ARGS]

commands:
  train          train the classifier (same flags as `python -m mnist_dist.train`; run under torchrun for DDP)
  download       fetch and verify MNIST into --data-dir (on a login node with internet)
  evaluate       test accuracy and loss of a saved checkpoint
  predict        the digit in each image file, with its probability
  export         write a weights-only model file (safetensors) for inference
  report         pictures of a run: predictions.png, confusion_matrix.png, curves.png
  sweep-report   table and plot of a sweep's runs
  hangs          what each rank was doing at a run's newest hang (its post-mortem)
  doctor         check the nodes before a job (start it as the job: torchrun, srun, submitit)
  init           run a command under a minimal init (containers without one): mnist-dist init -- torchrun ...

`mnist-dist COMMAND -h` shows a command's flags."""


def cmd_download(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="mnist-dist download", description="Fetch and verify MNIST once.")
    p.add_argument("--data-dir", default=None, help="MNIST root (default: $MNIST_DATA_DIR or ./data)")
    args = p.parse_args(argv)
    from . import data
    from .config import config_from_args, build_parser

    data_dir = args.data_dir or config_from_args(build_parser().parse_args([])).data_dir
    data.fetch(data_dir, download=True)
    print(f"MNIST is present and verified in {data.raw_dir(data_dir)}")
    return 0


def cmd_evaluate(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="mnist-dist evaluate", description="Evaluate a checkpoint on the 10,000 test images."
    )
    p.add_argument("--checkpoint", required=True, help="a ckpt-*.pt or best.pt file")
    p.add_argument(
        "--data-dir", default=None, help="MNIST root (default: the one saved in the checkpoint, or $MNIST_DATA_DIR)"
    )
    p.add_argument(
        "--no-verify-data", dest="verify", action="store_false", help="skip the SHA-256 check of the raw files"
    )
    args = p.parse_args(argv)
    from . import inference

    _, cfg, _, labels, result = inference.evaluate_checkpoint(args.checkpoint, args.data_dir, args.verify)
    print(f"test_acc {result.acc:.4f}  test_loss {result.loss:.4f}  ({len(labels)} images, {cfg['model']})")
    return 0


def cmd_predict(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="mnist-dist predict", description="Print the digit in each image and its probability.",
        epilog="Images are made to look like MNIST: grayscale, white digit on black, the digit scaled into a "
               "20x20 box and centred in 28x28 (28x28 images are used as they are). An image whose border is "
               "mostly light (dark ink on paper) is inverted automatically; --invert / --no-invert force it.")
    p.add_argument("--checkpoint", required=True)
    p.add_argument(
        "--invert", action=argparse.BooleanOptionalAction, default=None, help="invert the images (default: auto)"
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help="PNG or JPEG files, any size or mode")
    args = p.parse_args(argv)
    from . import inference

    model, _ = inference.load_model(args.checkpoint)
    for path, found in zip(args.images, inference.predict(model, args.images, args.invert), strict=True):
        print(f"{path}\t{found[0]}\t{found[1]:.3f}" if found else f"{path}\t-\tno digit found (the image is blank)")
    return 0


def cmd_export(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="mnist-dist export", description="Write the model's weights alone as safetensors.")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("out", help="output file, e.g. model.safetensors")
    args = p.parse_args(argv)
    from . import inference

    meta = inference.export(args.checkpoint, args.out)
    print(f"wrote {args.out} ({meta['model']}); load with safetensors.torch.load_file")
    return 0


def cmd_train(argv: list[str]) -> int:
    from .errors import exit_process
    from .train import main as train_main

    exit_process(train_main(argv))  # does not return
    return 0


def cmd_report(argv: list[str]) -> int:
    from .report import main as report_main

    return report_main(argv)


def cmd_sweep_report(argv: list[str]) -> int:
    from .sweep import main as sweep_main

    return sweep_main(argv)


def cmd_doctor(argv: list[str]) -> int:
    from .doctor import main as doctor_main

    return doctor_main(argv)


def cmd_init(argv: list[str]) -> int:
    from .container import init_main

    return init_main(argv)


def cmd_hangs(argv: list[str]) -> int:
    from .postmortem import main as hangs_main

    return hangs_main(argv)


COMMANDS = {
    "hangs": cmd_hangs, "train": cmd_train, "download": cmd_download, "evaluate": cmd_evaluate, "predict": cmd_predict,
    "export": cmd_export, "report": cmd_report, "sweep-report": cmd_sweep_report, "init": cmd_init,
    "doctor": cmd_doctor,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        print(f"mnist-dist: error: unknown command {argv[0]!r}\n{USAGE}", file=sys.stderr)
        return 2
    try:
        return COMMANDS[argv[0]](argv[1:])
    except UsageError as err:
        print_error(err)
        return err.exit_code


if __name__ == "__main__":
    sys.exit(main())
