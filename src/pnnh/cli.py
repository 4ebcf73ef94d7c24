"""The ``pnnh`` command line. Every user mistake ends in one line on stderr and exit code 2.

Sub-commands plug in from their own modules:

- ``pnnh probe NAME``: ``pnnh.probes.NAME`` exposes ``add_cli_arguments(parser)`` and
  ``run_cli(args)``; the common arguments (``--model``, ``--checkpoint``, ``--dataset``, ...)
  are added here (see :func:`add_probe_common_arguments`).
- ``pnnh reproduce NAME``: experiments listed in :mod:`pnnh.reproduce`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from pnnh.errors import PnnhError

PROBES = {
    "dissipation": "surviving units, input reconstructability, similarity collapse, rank",
    "norms": "gradient-norm ratio ||dL/dx_in|| / ||dL/dx_out|| per block",
    "hessian": "Hessian extreme eigenvalues, trace, spectrum, condition number",
    "jacobian": "singular values of the input-output Jacobian (dynamical isometry)",
}


class _Parser(argparse.ArgumentParser):
    """argparse that exits with code 2 and a one-line message (its default, kept explicit)."""

    def error(self, message: str):  # noqa: D401
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def add_model_arguments(p: argparse.ArgumentParser, multiple: bool = False) -> None:
    if multiple:
        p.add_argument("--model", action="append", help="registered model name (repeatable)")
    else:
        p.add_argument("--model", help="registered model name (see `pnnh models`)")
    p.add_argument("--depth", type=int, help="number of weight layers")
    p.add_argument("--width", type=int, help="hidden width / base channels")
    p.add_argument(
        "--model-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="family-specific model option, e.g. coder_ratio=0.5 (repeatable)",
    )


def add_probe_common_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p, multiple=True)
    p.add_argument("--checkpoint", help="a pnnh checkpoint (.pt) to probe instead of a fresh init")
    p.add_argument("--dataset", help="dataset of the probe batch (default: the checkpoint's, "
                   "else mnist1d)")
    p.add_argument("--data-dir", help="directory for cifar10/cifar100/imagefolder")
    p.add_argument("--num-samples", type=int, default=512, help="probe batch size (samples)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    p.add_argument("--out", required=True, help="output directory")


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The full parser. Only the probe named in ``argv`` (if any) is imported, to keep start-up fast."""
    from pnnh import __version__

    argv = list(sys.argv[1:] if argv is None else argv)
    chosen_probe = argv[1] if len(argv) > 1 and argv[0] == "probe" else None

    parser = _Parser(
        prog="pnnh",
        description="Deep plain neural networks (no residual connections) and depth diagnostics.",
    )
    parser.add_argument("--version", action="version", version=f"pnnh {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("models", help="list registered models with parameter counts")
    p.add_argument("--filter", default="", help="substring or glob of model names")

    p = sub.add_parser("train", help="train a model")
    _add_train_arguments(p)

    p = sub.add_parser("probe", help="diagnose a model (dissipation, norms, hessian, jacobian)")
    psub = p.add_subparsers(dest="probe", metavar="PROBE", parser_class=_Parser)
    psub.required = True
    for name, help_text in PROBES.items():
        pp = psub.add_parser(name, help=help_text)
        add_probe_common_arguments(pp)
        if name == chosen_probe:
            _probe_module(name).add_cli_arguments(pp)

    from pnnh import reproduce

    p = sub.add_parser("reproduce", help="run a paper experiment (see --list)")
    p.add_argument("name", nargs="?", choices=sorted(reproduce.EXPERIMENTS), metavar="NAME")
    p.add_argument("--list", action="store_true", help="list experiments with expected run time")
    p.add_argument("--scale", choices=["cpu", "paper"], default="cpu")
    p.add_argument("--out", help="output directory (default runs/reproduce/NAME)")
    p.add_argument("--device", default="auto", choices=["cpu", "cuda", "auto"])
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("report", help="assemble DIR/report.html from the runs under DIR")
    p.add_argument("dir")

    p = sub.add_parser("export", help="export a trained model (plain nn.Sequential or ONNX)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--format", choices=["plain", "onnx"], default="plain")
    p.add_argument("--out", required=True, help="output file")

    p = sub.add_parser("demo", help="the depth study on MNIST-1D (the main job)")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--quick", action="store_true", help="a tiny version for tests (< 1 minute)")
    p.add_argument("--seed", type=int, default=0)
    return parser


def _probe_module(name: str):
    return importlib.import_module(f"pnnh.probes.{name}")


def _add_train_arguments(p: argparse.ArgumentParser) -> None:
    from pnnh.config import OPTIMIZERS, SCHEDULES

    add_model_arguments(p)
    a = p.add_argument
    a("--dataset", help="mnist1d (default), digits, cifar10, cifar100, imagefolder, synthetic")
    a("--data-dir", help="directory holding cifar/imagefolder data")
    a("--dataset-arg", action="append", default=[], metavar="KEY=VALUE",
      help="dataset option, e.g. image_size=64 or input_shape=[3,16,16] (repeatable)")
    a("--epochs", type=int)
    a("--batch-size", type=int)
    a("--lr", type=float)
    a("--optimizer", choices=OPTIMIZERS)
    a("--momentum", type=float)
    a("--weight-decay", type=float)
    a("--schedule", choices=SCHEDULES)
    a("--warmup-epochs", type=float)
    a("--label-smoothing", type=float)
    a("--grad-clip", type=float)
    a("--seed", type=int)
    a("--device", choices=["cpu", "cuda", "auto"])
    a("--num-samples", type=int, help="dataset size for mnist1d/synthetic")
    a("--augment", action=argparse.BooleanOptionalAction, default=None)
    a("--track-norms", type=int, metavar="N", help="record per-block gradient norms every N steps")
    a("--amp", action=argparse.BooleanOptionalAction, default=None, help="mixed precision (cuda)")
    a("--channels-last", action=argparse.BooleanOptionalAction, default=None)
    a("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile")
    a("--tensorboard", action=argparse.BooleanOptionalAction, default=None)
    a("--max-steps-per-epoch", type=int)
    a("--progress", action=argparse.BooleanOptionalAction, default=None)
    a("--checkpoint-steps", type=int, metavar="N",
      help="also save checkpoints/last.pt every N steps inside an epoch (0: off)")
    a("--sync-bn", action=argparse.BooleanOptionalAction, default=None,
      help="synchronise BatchNorm statistics across torchrun processes (CUDA)")
    a("--procrustes", action="store_true", default=None,
      help="project constrained weights (coders / transitions) after each step")
    a("--zca", action="store_true", default=None, help="ZCA-whiten the classifier's input")
    a("--tat", action="store_true", default=None,
      help="plain models: leaky-ReLU TAT activations and orthogonal/Delta init (eta 0.9; "
      "--model-arg tat_eta=X)")
    a("--lr-multiplier", action="append", default=[], metavar="MODULE=X",
      help="train a top-level submodule at lr * X, e.g. blocks=0.1 (repeatable)")
    a("--config", help="YAML file of training options (flags override it)")
    a("--out", help="run directory (default runs/train)")
    a("--resume", action="store_true", default=None, help="continue from OUT/checkpoints/last.pt")


TRAIN_FLAG_FIELDS = (
    "model depth width dataset data_dir epochs batch_size lr optimizer momentum weight_decay "
    "schedule warmup_epochs label_smoothing grad_clip seed device num_samples augment "
    "track_norms amp channels_last compile tensorboard max_steps_per_epoch progress out resume "
    "checkpoint_steps sync_bn"
).split()


def train_config_from_args(args: argparse.Namespace):
    """Config file values, then the flags the user actually gave."""
    from pnnh.config import from_dict, load_yaml, parse_model_arg, validate

    base = from_dict(load_yaml(args.config)) if args.config else None
    overrides = {k: getattr(args, k) for k in TRAIN_FLAG_FIELDS if getattr(args, k) is not None}
    model_args = dict(parse_model_arg(t) for t in args.model_arg)
    if args.procrustes:
        model_args["procrustes"] = True
    if args.zca:
        model_args["zca"] = True
    if args.tat:
        model_args["tat"] = True
    if model_args:
        overrides["model_args"] = model_args
    dataset_args = dict(parse_model_arg(t, "--dataset-arg") for t in args.dataset_arg)
    if dataset_args:
        overrides["dataset_args"] = dataset_args
    lr_multipliers = dict(parse_model_arg(t, "--lr-multiplier") for t in args.lr_multiplier)
    if lr_multipliers:
        overrides["lr_multipliers"] = lr_multipliers
    return validate(from_dict(overrides, base))


def cmd_models(args) -> int:
    from pnnh.registry import count_parameters, create_model, list_models, model_info

    names = list_models(args.filter)
    if not names:
        print(f"no model matches {args.filter!r}")
        return 0
    rows = []
    for n in names:
        info = model_info(n)
        params = count_parameters(create_model(n))
        rows.append((n, info.family, info.kind, f"{params:,}", info.description))
    w = [max(len(r[i]) for r in rows + [("name", "family", "kind", "params", "")]) for i in range(4)]
    print(f"{'name':<{w[0]}}  {'family':<{w[1]}}  {'kind':<{w[2]}}  {'params':>{w[3]}}  description")
    for r in rows:
        print(f"{r[0]:<{w[0]}}  {r[1]:<{w[1]}}  {r[2]:<{w[2]}}  {r[3]:>{w[3]}}  {r[4]}")
    return 0


def cmd_train(args) -> int:
    from pnnh.train import train

    cfg = train_config_from_args(args)
    summary = train(cfg)
    if _is_main_rank():
        print(
            f"done: best_val_acc={summary['best_val_acc']:.4f} "
            f"final_val_acc={summary['final_val_acc']:.4f} -> {cfg.out}"
        )
    return 0


def cmd_probe(args) -> int:
    from pnnh.config import parse_model_arg

    if not args.model and not args.checkpoint:
        raise PnnhError("probe: give --model NAME (repeatable) or --checkpoint PATH", field="model")
    args.model_args = dict(parse_model_arg(t) for t in args.model_arg)
    _probe_module(args.probe).run_cli(args)
    return 0


def cmd_reproduce(args) -> int:
    from pnnh import reproduce

    if args.list or not args.name:
        print(reproduce.describe())
        return 0
    out = args.out or os.path.join("runs", "reproduce", args.name)
    reproduce.run(args.name, out=out, scale=args.scale, device=args.device, seed=args.seed)
    return 0


def cmd_report(args) -> int:
    from pnnh.report import build_report

    path = build_report(args.dir)
    print(f"report: {path}")
    return 0


def cmd_export(args) -> int:
    from pnnh.export import export_checkpoint

    path = export_checkpoint(args.checkpoint, args.format, args.out)
    print(f"exported: {path}")
    return 0


def cmd_demo(args) -> int:
    from pnnh.demo import run_demo

    run_demo(out=args.out, quick=args.quick, seed=args.seed)
    return 0


COMMANDS = {
    "models": cmd_models,
    "train": cmd_train,
    "probe": cmd_probe,
    "reproduce": cmd_reproduce,
    "report": cmd_report,
    "export": cmd_export,
    "demo": cmd_demo,
}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args) or 0
    except PnnhError as e:
        _say(f"pnnh: error: {e}")
        return e.exit_code
    except KeyboardInterrupt as e:  # pnnh.train.TrainingInterrupted carries 130 / 143
        _say(f"pnnh: {e}" if str(e) else "pnnh: interrupted")
        return getattr(e, "exit_code", 130)


def _is_main_rank() -> bool:
    """Under torchrun only rank 0 speaks (every rank meets the same error)."""
    return os.environ.get("RANK", "0") == "0"


def _say(message: str) -> None:
    if _is_main_rank():
        print(" ".join(message.split("\n")), file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
