"""What every probe needs: the blocks of a model, models (registered, from a checkpoint or from
the user's own file) and a fixed batch (from a dataset or synthetic, of a given shape).

Block discovery, :func:`find_blocks` (and :func:`unwrap`, which sees through DDP and
``torch.compile``), lives in :mod:`pnnh.plainness` (the model layer, which the plainness checker
also uses) and is re-exported here: every probe and the checker share one discovery helper.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from pnnh.errors import ConfigError
from pnnh.plainness import MIN_SEQUENTIAL, find_blocks, unwrap  # noqa: F401 (re-exported)


@dataclass
class ProbeTarget:
    label: str  # what plots and tables call this model
    model: nn.Module  # in eval mode, on the requested device
    inputs: torch.Tensor
    targets: torch.Tensor


@dataclass
class ProbeResult:
    """What every probe's ``run`` returns (see :mod:`pnnh.probes` for the contract).

    ``records`` are tidy rows (one per model, or per model and block/layer) that the runner
    writes to ``OUT/NAME.csv`` (in ``columns`` order when given) and ``OUT/NAME.json``;
    ``notes`` are the lines printed after the records are written; ``files`` are the other
    files the probe wrote (figures, extra tables).
    """

    records: list[dict]
    columns: list[str] | None = None
    notes: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)


def first_tensor(x) -> torch.Tensor | None:
    """``x`` if a tensor, else the first tensor in the tuple/list ``x`` (a hook's ``args`` or a
    module's structured output), else ``None``."""
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (tuple, list)):
        for item in x:
            if isinstance(item, torch.Tensor):
                return item
    return None


# ----------------------------------------------------------------------------- models
def load_model_file(spec: str) -> nn.Module:
    """``FILE.py:FACTORY`` -> ``FACTORY()`` from that file (an ``nn.Module``)."""
    path, sep, factory = spec.rpartition(":")
    if not sep or not path or not factory.isidentifier():
        raise ConfigError(f"--model-file: expected FILE.py:FACTORY, got {spec!r}",
                          field="model_file")
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--model-file: {file} does not exist", field="model_file")
    name = f"pnnh_user_model_{abs(hash(str(file.resolve())))}"
    module_spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    module_spec.loader.exec_module(module)
    fn = getattr(module, factory, None)
    if not callable(fn):
        raise ConfigError(f"--model-file: {file} has no callable {factory!r}", field="model_file")
    model = fn()
    if not isinstance(model, nn.Module):
        raise ConfigError(f"--model-file: {factory}() in {file} returned "
                          f"{type(model).__name__}, not an nn.Module", field="model_file")
    return model


def parse_input_shape(text: str | None) -> tuple[int, ...] | None:
    """``"3,32,32"`` -> ``(3, 32, 32)`` (``L``, ``C,L`` or ``C,H,W``; positive integers)."""
    if text is None:
        return None
    try:
        shape = tuple(int(t) for t in text.replace("x", ",").split(",") if t.strip())
    except ValueError:
        shape = ()
    if not 1 <= len(shape) <= 3 or min(shape) < 1:
        raise ConfigError(f"--input-shape: expected L, C,L or C,H,W (positive integers), "
                          f"got {text!r}", field="input_shape")
    return shape


# ----------------------------------------------------------------------------- batches
def probe_batch(dataset: str, data_dir: str | None, num_samples: int, seed: int = 0,
                dataset_args: dict | None = None):
    """``num_samples`` validation samples drawn with a seeded generator: ``(inputs, targets, ds)``."""
    from pnnh.data import get_dataset

    if num_samples < 2:
        raise ConfigError(f"num_samples: need at least 2, got {num_samples}", field="num_samples")
    try:
        _, val = get_dataset(dataset, data_dir, seed=seed, **(dataset_args or {}))
    except TypeError as e:
        raise ConfigError(f"--dataset-arg: {e}", field="dataset_args") from None
    idx = torch.randperm(len(val), generator=torch.Generator().manual_seed(seed))[:num_samples]
    if hasattr(val, "tensors"):
        x, y = val.tensors[0][idx], val.tensors[1][idx]
    else:
        items = [val[i] for i in idx.tolist()]
        x = torch.stack([it[0] for it in items])
        y = torch.tensor([int(it[1]) for it in items])
    return x, y, val


def synthetic_batch(shape: tuple[int, ...], num_samples: int, num_classes: int, seed: int = 0):
    """A seeded standard-normal batch ``(num_samples, *shape)`` and uniform labels below
    ``num_classes``: what a probe runs on when no dataset feeds the model."""
    if num_samples < 2:
        raise ConfigError(f"num_samples: need at least 2, got {num_samples}", field="num_samples")
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_samples, *shape, generator=g)
    y = torch.randint(0, max(int(num_classes), 1), (num_samples,), generator=g)
    return x, y


def _default_in_shape(name: str) -> tuple[int, ...] | None:
    import inspect

    from pnnh.models import model_info

    info = model_info(name)
    shape = info.defaults.get("in_shape")
    if shape is None:
        p = inspect.signature(info.factory).parameters.get("in_shape")
        shape = p.default if p is not None and p.default is not inspect.Parameter.empty else None
    return tuple(shape) if shape is not None else None


def check_model_flags(args: argparse.Namespace) -> None:
    """One model source (``--model``, ``--checkpoint`` or ``--model-file``), and one batch
    source (``--input-shape`` or ``--dataset``/``--data-dir``): else a one-line error."""
    given = [f for f, v in (("--model", args.model), ("--checkpoint", args.checkpoint),
                            ("--model-file", getattr(args, "model_file", None))) if v]
    if len(given) != 1:
        raise ConfigError("probe: give exactly one of --model NAME (repeatable), --checkpoint "
                          f"PATH, --model-file FILE.py:FACTORY (got {', '.join(given) or 'none'})",
                          field="model")
    if getattr(args, "input_shape", None) and (args.dataset or args.data_dir):
        raise ConfigError("probe: --input-shape (a synthetic batch) and --dataset/--data-dir "
                          "exclude each other", field="input_shape")


def _batch_for(model: nn.Module, args: argparse.Namespace, shape, seed: int):
    """The probe batch of a model that has no dataset of its own: synthetic of ``shape``, the
    labels below the model's output width."""
    x, _ = synthetic_batch(shape, args.num_samples, 1, seed)
    model.eval()
    try:
        with torch.no_grad():
            out = model(x[:2])
    except Exception as e:  # the user's model on the wrong shape: say which shape was tried
        raise ConfigError(f"probe: the model does not accept a batch of shape "
                          f"{tuple(x.shape[1:])} ({type(e).__name__}: {e}); give "
                          "--input-shape", field="input_shape") from None
    classes = out.shape[-1] if isinstance(out, torch.Tensor) and out.ndim >= 2 else 1
    return synthetic_batch(shape, args.num_samples, classes, seed)


def _dataset_args(args: argparse.Namespace) -> dict:
    from pnnh.config import parse_model_arg

    return dict(parse_model_arg(t, "--dataset-arg") for t in getattr(args, "dataset_arg", []) or [])


def probe_targets(args: argparse.Namespace) -> list[ProbeTarget]:
    """Resolve ``--model`` (repeatable), ``--checkpoint`` or ``--model-file`` plus the batch
    options (``--dataset``/``--dataset-arg`` or ``--input-shape``) into targets."""
    from pnnh.device import pick_device

    check_model_flags(args)
    device = pick_device(getattr(args, "device", "cpu") or "cpu")
    seed = getattr(args, "seed", 0) or 0
    shape = parse_input_shape(getattr(args, "input_shape", None))
    if getattr(args, "model_file", None):
        torch.manual_seed(seed)
        model = load_model_file(args.model_file)
        label = Path(args.model_file.rpartition(":")[0]).stem + ":" + args.model_file.rpartition(":")[2]
        if shape is not None:
            x, y = _batch_for(model, args, shape, seed)
        else:
            x, y, _ = probe_batch(args.dataset or "mnist1d", args.data_dir, args.num_samples,
                                  seed, _dataset_args(args))
        return [ProbeTarget(label, model.to(device).eval(), x.to(device), y.to(device))]
    if args.checkpoint:
        return [_checkpoint_target(args, device, seed, shape)]
    return [_registry_target(name, args, device, seed, shape) for name in
            (args.model if isinstance(args.model, list) else [args.model])]


def _checkpoint_target(args, device, seed: int, shape) -> ProbeTarget:
    from pnnh.checkpoint import load_model

    model, ckpt = load_model(args.checkpoint, map_location="cpu")
    label = f"{ckpt['model_name']} (epoch {ckpt.get('epoch')})"
    if shape is not None:
        x, y = _batch_for(model, args, shape, seed)
    else:
        cfg = ckpt.get("config", {})
        dataset = args.dataset or cfg.get("dataset") or "mnist1d"
        data_dir = args.data_dir or cfg.get("data_dir")
        dargs = _dataset_args(args) or (cfg.get("dataset_args") or {} if not args.dataset else {})
        x, y, _ = probe_batch(dataset, data_dir, args.num_samples, seed, dargs)
    return ProbeTarget(label, model.to(device).eval(), x.to(device), y.to(device))


def _registry_target(name: str, args, device, seed: int, shape) -> ProbeTarget:
    from pnnh.models import create_model

    model_args = dict(getattr(args, "model_args", {}) or {})
    label = name if args.depth is None else f"{name}-{args.depth}"
    own = _default_in_shape(name)
    if shape is None and not args.dataset and own is not None and own != (1, 40):
        shape = own  # the default dataset (mnist1d, (1, 40)) cannot feed this model
        print(f"{label}: mnist1d's inputs (1, 40) do not fit its input shape {own}; probing "
              f"a seeded synthetic batch of shape {own} (give --dataset to use data)")
    if shape is not None:
        x, y = synthetic_batch(shape, args.num_samples, model_args.get("num_classes", 10), seed)
        in_shape, classes = shape, model_args.pop("num_classes", 10)
    else:
        x, y, val = probe_batch(args.dataset or "mnist1d", args.data_dir, args.num_samples, seed,
                                _dataset_args(args))
        in_shape, classes = tuple(val.input_shape), val.num_classes
    torch.manual_seed(seed)
    model = create_model(name, in_shape=in_shape, num_classes=classes, depth=args.depth,
                         width=args.width, **model_args)
    return ProbeTarget(label, model.to(device).eval(), x.to(device), y.to(device))
