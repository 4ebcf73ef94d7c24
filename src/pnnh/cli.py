"""The ``pnnh`` command line. Every user mistake ends in one line on stderr and exit code 2.

Sub-commands plug in from their own modules:

- ``pnnh probe NAME``: ``pnnh.probes.NAME`` exposes ``add_cli_arguments(parser)`` and
  ``run(targets, args, out)``, run by the one runner :func:`pnnh.probes.run_cli`; the common
  arguments (``--model``, ``--checkpoint``, ``--dataset``, ...) are added here (see
  :func:`add_probe_common_arguments`).
- ``pnnh reproduce NAME``: experiments listed in :mod:`pnnh.reproduce`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import NoReturn

from pnnh.errors import ConfigError, PnnhError

PROBES = {
    "dissipation": "surviving units, input reconstructability, similarity collapse, rank",
    "norms": "gradient-norm ratio ||dL/dx_in|| / ||dL/dx_out|| per block",
    "hessian": "Hessian extreme eigenvalues, trace, spectrum, condition number",
    "jacobian": "singular values of the input-output Jacobian (dynamical isometry)",
    "skips": "residual connections (identity, projection) and gates, by block",
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
    p.add_argument("--model-file", metavar="FILE.py:FACTORY",
                   help="your own model: FACTORY() in FILE.py returns an nn.Module")
    p.add_argument("--input-shape", metavar="C,H,W",
                   help="probe a seeded synthetic batch of this shape (L, C,L or C,H,W; "
                   "tokens:LENGTH[,vocab=V] for token ids) instead of a dataset")
    p.add_argument("--output", metavar="KEY",
                   help="which output to measure when the model returns a ModelOutput, dict or "
                   "tuple (default: logits, else its only / first tensor)")
    p.add_argument("--bn", choices=["auto", "batch", "running"], default="auto",
                   help="BatchNorm statistics: batch (the batch's, as a training step sees), "
                   "running (eval mode), auto (batch for BatchNorms whose running statistics "
                   "never saw data, running otherwise; the default)")
    p.add_argument("--dataset", help="dataset of the probe batch (default: the checkpoint's, "
                   "else mnist1d)")
    p.add_argument("--data-dir", help="directory for cifar10/cifar100/imagefolder, or the IDX "
                   "files of fashion_mnist/mnist (default for those: $PNNH_DATA_DIR, the pnnh "
                   "cache, /usr/share/datasets)")
    p.add_argument("--dataset-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="dataset option, e.g. input_shape=[3,16,16] (repeatable)")
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
    p.add_argument("--scale", choices=list(reproduce.SCALES), default="cpu",
                   help="quick: seconds, test size; cpu: minutes on a CPU (default); "
                        "paper: the paper's setting")
    p.add_argument("--out", help="output directory (default runs/reproduce/NAME)")
    p.add_argument("--device", default="auto", choices=["cpu", "cuda", "auto"])
    seeds = p.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=int, default=0)
    seeds.add_argument("--seeds", type=int, nargs="+", metavar="S",
                       help="run once per seed into OUT/s<S>, then the statistics over them "
                            "(OUT/seeds.json; experiments that define them: deep-plain)")

    p = sub.add_parser("report", help="assemble DIR/report.html from the runs under DIR")
    p.add_argument("dir")

    p = sub.add_parser("export", help="export a trained model (plain nn.Sequential or ONNX); "
                                      "a ResNet is converted to its exact plain form")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a pnnh training checkpoint")
    src.add_argument("--model-file", metavar="FILE.py:FACTORY",
                     help="your own model: FACTORY() from FILE.py (e.g. a torchvision or timm "
                          "ResNet with its weights loaded)")
    p.add_argument("--input-shape", metavar="C,H,W",
                   help="input shape without the batch (with --model-file; default: the "
                        "model's in_shape)")
    p.add_argument("--format", choices=["plain", "onnx"], default="plain")
    p.add_argument("--out", required=True, help="output file")

    p = sub.add_parser("data", help="get a data set: `pnnh data fetch fashion_mnist`")
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION", parser_class=_Parser)
    dsub.required = True
    pf = dsub.add_parser("fetch", help="a data set from Debian's package into the pnnh cache, "
                                       "once (nothing when it is already there)")
    pf.add_argument("name", metavar="NAME", type=lambda s: s.replace("-", "_"),
                    choices=["fashion_mnist"], help="fashion_mnist (or fashion-mnist)")

    p = sub.add_parser("demo", help="the depth study on Fashion-MNIST, or MNIST-1D without it "
                                     "(the main job)")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--dataset", choices=["auto", "fashion_mnist", "mnist1d"], default="auto",
                   help="auto: Fashion-MNIST where its files are found, else MNIST-1D (saying why)")
    p.add_argument("--quick", action="store_true", help="a tiny version for tests (< 1 minute)")
    p.add_argument("--seed", type=int, default=0)
    return parser


def _probe_module(name: str):
    return importlib.import_module(f"pnnh.probes.{name}")


def _add_train_arguments(p: argparse.ArgumentParser) -> None:
    """``--model/--depth/--width/--model-arg`` (shared with the probes), a flag per
    TrainConfig field (:func:`add_config_flags`), and the few flags that are not one field."""
    add_model_arguments(p)
    a = p.add_argument
    add_config_flags(p, skip=("model", "depth", "width"))
    a("--dataset-arg", action="append", default=[], metavar="KEY=VALUE",
      help="dataset option, e.g. image_size=64 or input_shape=[3,16,16] (repeatable)")
    a("--procrustes", action="store_true", default=None,
      help="project constrained weights (coders / transitions) after each step")
    a("--zca", action="store_true", default=None, help="ZCA-whiten the classifier's input")
    a("--tat", action="store_true", default=None,
      help="plain models: leaky-ReLU TAT activations and orthogonal/Delta init (eta 0.9; "
      "--model-arg tat_eta=X)")
    a("--lr-multiplier", action="append", default=[], metavar="MODULE=X",
      help="train a submodule at lr * X: a top-level name (blocks=0.1) or a dotted pattern "
           "(blocks.*.enc=0.3); the most specific key wins (repeatable)")
    a("--config", help="YAML file of training options (flags override it)")
    a("--resume", nargs="?", const=True, default=None, choices=("auto", "true", "false"),
      help="continue from OUT/checkpoints/last.pt (prev.pt if last.pt is damaged); "
      "'--resume auto': only a checkpoint of this same configuration, refuse another one "
      "(the default under torchrun, so that an elastic restart continues)")
    a("--no-resume", dest="resume", action="store_const", const=False,
      help="start afresh even under torchrun")


def add_config_flags(p: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> list[str]:
    """One ``--field-name`` per :class:`pnnh.config.TrainConfig` field (help, choices and
    metavar from the field's metadata; fields marked ``flag=False`` are set another way).
    Every flag defaults to None, meaning "not given", so a config file's value survives it.
    Returns the field names that got a flag."""
    import dataclasses

    from pnnh.config import TrainConfig

    added = []
    for f in dataclasses.fields(TrainConfig):
        meta = f.metadata
        if f.name in skip or not meta.get("flag", True):
            continue
        kind = str(f.type).split(" | ")[0]
        default = "" if f.default in (None, "") else f" (default {f.default})"
        kw: dict = {"help": meta.get("help", "") + default, "default": None}
        if kind == "bool":
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = {"int": int, "float": float}.get(kind, str)
            for key in ("choices", "metavar"):
                if key in meta:
                    kw[key] = meta[key]
        p.add_argument("--" + f.name.replace("_", "-"), **kw)
        added.append(f.name)
    return added


def _train_flag_fields() -> list[str]:
    """The TrainConfig fields set straight from a flag of the same name."""
    import dataclasses

    from pnnh.config import TrainConfig

    return [f.name for f in dataclasses.fields(TrainConfig) if f.metadata.get("flag", True)
            ] + ["resume"]


def train_config_from_args(args: argparse.Namespace):
    """Config file values, then the flags the user actually gave."""
    from pnnh.config import from_dict, load_yaml, parse_model_arg, validate

    base = from_dict(load_yaml(args.config)) if args.config else None
    overrides = {k: getattr(args, k) for k in _train_flag_fields() if getattr(args, k) is not None}
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
    from pnnh.models import count_parameters, create_model, list_models, model_info

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
    from pnnh.probes.common import check_model_flags

    check_model_flags(args)
    args.model_args = dict(parse_model_arg(t) for t in args.model_arg)
    from pnnh.probes import run_cli

    run_cli(args.probe, args)
    return 0


def cmd_reproduce(args) -> int:
    from pnnh import reproduce

    if args.list or not args.name:
        print(reproduce.describe())
        return 0
    out = args.out or os.path.join("runs", "reproduce", args.name)
    if args.seeds:
        reproduce.run_seeds(args.name, out=out, seeds=args.seeds, scale=args.scale,
                            device=args.device)
        return 0
    reproduce.run(args.name, out=out, scale=args.scale, device=args.device, seed=args.seed)
    return 0


def cmd_report(args) -> int:
    from pnnh.report import build_report

    path = build_report(args.dir)
    print(f"report: {path}")
    return 0


def cmd_export(args) -> int:
    from pnnh.checkpoint import export_checkpoint, export_model

    if args.checkpoint:
        if args.input_shape:
            raise ConfigError("--input-shape: only with --model-file (a checkpoint stores its "
                              "shape)", field="input_shape")
        path = export_checkpoint(args.checkpoint, args.format, args.out)
    else:
        from pnnh.probes.common import load_model_file, parse_input_shape

        model = load_model_file(args.model_file)
        shape = parse_input_shape(args.input_shape) or tuple(getattr(model, "in_shape", ()))
        if not shape:
            raise ConfigError("--input-shape: needed with --model-file (the model has no "
                              "in_shape), e.g. --input-shape 3,224,224", field="input_shape")
        path = export_model(model, args.format, args.out, shape,
                            {"source": args.model_file})
    print(f"exported: {path}")
    return 0


def cmd_data(args) -> int:
    """``pnnh data fetch NAME``: one line; exit 0 also when it could not fetch (it says why),
    so that the set-up goes on without the data."""
    from pnnh.fetch import fetch

    ok, message = fetch(args.name)
    print(message, file=sys.stdout if ok else sys.stderr, flush=True)
    return 0


def cmd_demo(args) -> int:
    from pnnh.demo import run_demo

    run_demo(out=args.out, quick=args.quick, seed=args.seed, dataset=args.dataset)
    return 0


COMMANDS = {
    "models": cmd_models,
    "train": cmd_train,
    "probe": cmd_probe,
    "reproduce": cmd_reproduce,
    "report": cmd_report,
    "export": cmd_export,
    "demo": cmd_demo,
    "data": cmd_data,
}


QUICK_ENV = "PNNH_QUICK"


def apply_quick(args: argparse.Namespace) -> None:
    """``PNNH_QUICK=1``: every command finishes in seconds with the same code paths (the
    docs-commands test runs README's and docs/'s commands this way). ``train``: 1 epoch of at
    most 2 steps on at most 512 MNIST-1D/synthetic samples; ``probe``: at most 64 samples and
    short Hessian/Jacobian iterations; ``demo``: ``--quick``. Depths and widths are kept.
    ``reproduce``: ``--scale quick``, whatever scale was asked for (each experiment's test-sized
    form, :mod:`pnnh.reproduce`)."""
    if os.environ.get(QUICK_ENV, "0") in ("", "0"):
        return
    if args.command == "train":
        args.epochs, args.max_steps_per_epoch, args.progress = 1, 2, False
        args.num_samples = min(args.num_samples or 512, 512)
    elif args.command == "probe":
        args.num_samples = min(args.num_samples, 64)
        for name, cap in (("max_iter", 8), ("hutchinson_samples", 4), ("slq_runs", 1),
                          ("slq_steps", 4), ("dense_limit", 300), ("power_iters", 10)):
            if getattr(args, name, None) is not None:
                setattr(args, name, min(getattr(args, name), cap))
    elif args.command == "demo":
        args.quick = True
    elif args.command == "reproduce":
        args.scale = "quick"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    apply_quick(args)
    try:
        return COMMANDS[args.command](args) or 0
    except PnnhError as e:
        if os.environ.get("PNNH_DEBUG", "0") not in ("", "0"):
            import traceback  # the full story, the user's own code included

            traceback.print_exception(e)
        _say(f"pnnh: error: {e}", every_rank=e.every_rank)
        return e.exit_code
    except KeyboardInterrupt as e:  # pnnh.train.TrainingInterrupted carries 130 / 143
        _say(f"pnnh: {e}" if str(e) else "pnnh: interrupted")
        return getattr(e, "exit_code", 130)


def run(argv: list[str] | None = None) -> NoReturn:
    """The process entry (``pnnh``, ``python -m pnnh``, ``torchrun -m pnnh``): :func:`main`, then exit.

    A worker under ``torchrun`` leaves through ``os._exit`` once :func:`main` has returned —
    its files written atomically and closed, the process group destroyed, the standard streams
    flushed — so the interpreter's shutdown never runs the C++ destructors of gloo's threads,
    which under load could still abort a finished rank ("terminate called without an active
    exception", SIGABRT) and turn a finished job into a failed one (docs/RELIABILITY.md).
    """
    from pnnh.allocator import retain_freed_memory
    from pnnh.device import under_torchrun

    retain_freed_memory()  # one job, then exit: freed memory kept for the next pass
    code = main(argv)
    if under_torchrun():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def _is_main_rank() -> bool:
    """Under torchrun only rank 0 speaks (every rank meets the same error)."""
    return os.environ.get("RANK", "0") == "0"


def _say(message: str, every_rank: bool = False) -> None:
    if every_rank or _is_main_rank():
        print(" ".join(message.split("\n")), file=sys.stderr, flush=True)


if __name__ == "__main__":
    run()
