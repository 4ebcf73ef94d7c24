"""What every probe needs: the blocks of a model, models (registered, from a checkpoint or from
the user's own file) and a fixed batch (from a dataset or synthetic, of a given shape).

Block discovery, :func:`find_blocks` (and :func:`unwrap`, which sees through DDP and
``torch.compile``), lives in :mod:`pnnh.plainness` (the model layer, which the plainness checker
also uses) and is re-exported here: every probe and the checker share one discovery helper.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
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


# ----------------------------------------------------------------------------- outputs
DEFAULT_OUTPUT = "logits"


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}" if text else type(e).__name__


def select_output(out, key: str | int | None = None) -> torch.Tensor:
    """The tensor a probe measures in a model's output ``out``.

    A tensor is itself. A mapping (a Hugging Face ``ModelOutput``, a dict) gives ``out[key]``,
    by default ``"logits"``, else its only tensor; a tuple or list gives ``out[key]`` for an
    integer ``key`` (``"0"`` from the command line), by default its first tensor; any other
    object its attribute ``key`` (default ``logits``). Anything else is a one-line
    :class:`ConfigError` naming what there is (``--output KEY`` chooses).
    """
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping):
        tensors = {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}
        if key is None and DEFAULT_OUTPUT in tensors:
            return tensors[DEFAULT_OUTPUT]
        if key is None and len(tensors) == 1:
            return next(iter(tensors.values()))
        if key is not None and str(key) in tensors:
            return tensors[str(key)]
        raise ConfigError(f"output: the model returns {type(out).__name__} with tensors "
                          f"{', '.join(map(str, tensors)) or '(none)'}; choose one with --output "
                          f"KEY (output=KEY){'' if key is None else f', not {key!r}'}",
                          field="output")
    if isinstance(out, (tuple, list)):
        if key is None:
            t = first_tensor(out)
            if t is not None:
                return t
        elif str(key).lstrip("-").isdigit() and -len(out) <= int(key) < len(out) \
                and isinstance(out[int(key)], torch.Tensor):
            return out[int(key)]
        raise ConfigError(f"output: the model returns a {type(out).__name__} of {len(out)} items; "
                          "choose a tensor item with --output INDEX (output=INDEX)", field="output")
    value = getattr(out, DEFAULT_OUTPUT if key is None else str(key), None)
    if isinstance(value, torch.Tensor):
        return value
    raise ConfigError(f"output: the model returns {type(out).__name__}, not a tensor; choose a "
                      "tensor attribute or item with --output KEY (output=KEY)", field="output")


def cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy, classes on the last axis when the targets have the outputs' shape
    without it (a language model's ``(batch, tokens, vocab)`` logits against ``(batch, tokens)``
    labels); otherwise :func:`torch.nn.functional.cross_entropy` as it is (classes on axis 1)."""
    if outputs.ndim >= 3 and tuple(outputs.shape[:-1]) == tuple(targets.shape):
        return F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1))
    return F.cross_entropy(outputs, targets)


def math_attention():
    """Scaled-dot-product attention on the math backend: plain differentiable ops, so both
    forward-mode AD and double backward go through (the fused CPU kernel has neither)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


# ----------------------------------------------------------------------------- token inputs
def input_embedding(model: nn.Module) -> nn.Module | None:
    """The module that turns token ids into vectors: ``model.get_input_embeddings()`` (Hugging
    Face), else the first ``nn.Embedding``; ``None`` if there is none."""
    get = getattr(unwrap(model), "get_input_embeddings", None)
    if callable(get):
        try:
            emb = get()
        except (NotImplementedError, AttributeError):
            emb = None
        if isinstance(emb, nn.Module):
            return emb
    return next((m for m in unwrap(model).modules() if isinstance(m, nn.Embedding)), None)


def require_embedding(model: nn.Module, probe: str) -> nn.Module:
    emb = input_embedding(model)
    if emb is None:
        raise ConfigError(f"{probe}: the inputs are token ids but the model has no input "
                          "embedding (get_input_embeddings() or an nn.Embedding) to measure "
                          "from", field="inputs")
    return emb


@contextlib.contextmanager
def embedding_output(model: nn.Module, value: torch.Tensor | None = None) -> Iterator[list]:
    """Inside the block, the model's input embedding (:func:`input_embedding`) returns
    ``value`` instead of its own output when ``value`` is given, and every output it produces
    is appended to the yielded list. Token-id models are measured from here: a derivative
    with respect to discrete ids does not exist, one with respect to their vectors does."""
    emb = require_embedding(model, "probe")
    seen: list[torch.Tensor] = []

    def hook(_m, _args, out):
        out = value.reshape(out.shape) if value is not None else out
        seen.append(out)
        return out

    handle = emb.register_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


# ----------------------------------------------------------------------------- BatchNorm
BN_MODES = ("auto", "batch", "running")
_BN_CHUNK = 128  # samples per forward pass when a batch's statistics are collected


def batchnorms(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every BatchNorm (``nn.BatchNorm1d/2d/3d``, ``SyncBatchNorm`` and subclasses such as
    timm's ``BatchNormAct2d``) of ``model``, by qualified name."""
    return [(n, m) for n, m in unwrap(model).named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def unseen(bn: nn.Module) -> bool:
    """Whether a BatchNorm's running statistics never saw data: ``num_batches_tracked == 0``
    *and* the statistics still at their initial values (mean 0, variance 1), so that weights
    loaded from an old checkpoint without the counter are not mistaken for fresh ones."""
    count = getattr(bn, "num_batches_tracked", None)
    mean, var = getattr(bn, "running_mean", None), getattr(bn, "running_var", None)
    if count is None or mean is None or var is None or int(count) != 0:
        return False
    return bool((mean == 0).all()) and bool((var == 1).all())


@contextlib.contextmanager
def bn_statistics(model: nn.Module, mode: str = "auto",
                  fixed_on: torch.Tensor | None = None) -> Iterator[str]:
    """Which statistics the model's BatchNorms normalise with inside the block; yields what
    ran (``"none"``, ``"running"``, ``"batch"``, ``"batch, held fixed"``), which every probe
    record carries as ``bn``.

    In eval mode a fresh BatchNorm (running mean 0, variance 1) is the identity, which is not
    what the network computes on its first training step: there every BatchNorm normalises
    with the statistics of the batch. ``mode``: ``"running"`` leaves the model as it is;
    ``"batch"`` makes every BatchNorm use the batch's statistics; ``"auto"`` (the default of
    ``pnnh probe``) only those whose running statistics never saw data (:func:`unseen`).
    Chosen BatchNorms compute ``γ (z − mean_B z)/√(var_B z + ε) + β`` over the batch ``B``
    being run, gradients flowing through the statistics as in training, and their running
    statistics are not updated. With ``fixed_on`` (for probes that need samples to be
    independent: per-sample Jacobians, layer statistics gathered in chunks) the statistics are
    instead those of ``fixed_on``, computed once and then held fixed as if they were running
    statistics (the variance is the unbiased one, as running statistics are). The model's
    modules and buffers are restored on exit.
    """
    if mode not in BN_MODES:
        raise ConfigError(f"--bn: one of {', '.join(BN_MODES)}, got {mode!r}", field="bn")
    bns = [m for _, m in batchnorms(model)]
    chosen = [] if mode == "running" else [m for m in bns if mode == "batch" or unseen(m)]
    if not chosen:
        yield "running" if bns else "none"
        return
    saved = [(m, m.training, m.track_running_stats, m.momentum,
              {k: b.detach().clone() for k, b in m.named_buffers(recurse=False)}) for m in chosen]
    try:
        if fixed_on is None:
            for m in chosen:  # batch statistics, running buffers neither read nor written
                m.train(True)
                m.track_running_stats = False
            yield "batch"
            return
        for m in chosen:  # the cumulative average over chunks of fixed_on
            m.reset_running_stats()
            m.momentum = None
            m.train(True)
        with torch.no_grad():
            for start in range(0, fixed_on.shape[0], _BN_CHUNK):
                model(fixed_on[start:start + _BN_CHUNK])
        for m in chosen:
            m.train(False)
        yield "batch, held fixed"
    finally:
        for m, training, track, momentum, buffers in saved:
            m.train(training)
            m.track_running_stats, m.momentum = track, momentum
            for k, b in buffers.items():
                getattr(m, k).copy_(b)


# ----------------------------------------------------------------------------- models
def load_model_file(spec: str) -> nn.Module:
    """``FILE.py:FACTORY`` -> ``FACTORY()`` from that file (an ``nn.Module``).

    A file that fails to import, a factory that raises or returns something else: one
    :class:`ConfigError` line naming the file, the factory and the exception (the cause stays
    chained; ``PNNH_DEBUG=1`` prints its traceback)."""
    path, sep, factory = spec.rpartition(":")
    if not sep or not path or not factory.isidentifier():
        raise ConfigError(f"--model-file: expected FILE.py:FACTORY, got {spec!r}",
                          field="model_file")
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--model-file: {file} does not exist", field="model_file")
    name = f"pnnh_user_model_{abs(hash(str(file.resolve())))}"
    module_spec = importlib.util.spec_from_file_location(name, file)
    if module_spec is None or module_spec.loader is None:
        raise ConfigError(f"--model-file: {file} is not a Python file", field="model_file")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # the user's code: one line, the traceback under PNNH_DEBUG=1
        sys.modules.pop(name, None)
        raise ConfigError(f"--model-file: importing {file} failed: {_one_line(e)}",
                          field="model_file") from e
    fn = getattr(module, factory, None)
    if not callable(fn):
        raise ConfigError(f"--model-file: {file} has no callable {factory!r}", field="model_file")
    try:
        model = fn()
    except Exception as e:
        raise ConfigError(f"--model-file: {factory}() in {file} raised {_one_line(e)}",
                          field="model_file") from e
    if not isinstance(model, nn.Module):
        raise ConfigError(f"--model-file: {factory}() in {file} returned "
                          f"{type(model).__name__}, not an nn.Module", field="model_file")
    return model


@dataclass(frozen=True)
class TokenShape:
    """``--input-shape tokens:LENGTH[,vocab=V]``: a batch of token ids ``(N, LENGTH)`` drawn
    uniformly below ``vocab`` (``None``: the model's own vocabulary size)."""

    length: int
    vocab: int | None = None


def parse_input_shape(text: str | None) -> tuple[int, ...] | TokenShape | None:
    """``"3,32,32"`` -> ``(3, 32, 32)`` (``L``, ``C,L`` or ``C,H,W``; positive integers);
    ``"tokens:128,vocab=30522"`` -> ``TokenShape(128, 30522)`` (``vocab`` optional)."""
    if text is None:
        return None
    if text.startswith("tokens:"):
        length, vocab, ok = None, None, True
        for part in filter(None, (t.strip() for t in text[len("tokens:"):].split(","))):
            key, eq, value = part.partition("=")
            if not eq and length is None and key.isdigit():
                length = int(key)
            elif eq and key.strip() == "vocab" and value.strip().isdigit():
                vocab = int(value)
            else:
                ok = False
        if ok and length and (vocab is None or vocab >= 1):
            return TokenShape(length, vocab)
        raise ConfigError(f"--input-shape: expected tokens:LENGTH[,vocab=V] (positive integers), "
                          f"got {text!r}", field="input_shape")
    try:
        shape = tuple(int(t) for t in text.replace("x", ",").split(",") if t.strip())
    except ValueError:
        shape = ()
    if not 1 <= len(shape) <= 3 or min(shape) < 1:
        raise ConfigError(f"--input-shape: expected L, C,L or C,H,W (positive integers) or "
                          f"tokens:LENGTH[,vocab=V], got {text!r}", field="input_shape")
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


def synthetic_batch(shape: tuple[int, ...] | TokenShape, num_samples: int, num_classes: int,
                    seed: int = 0, label_shape: tuple[int, ...] = ()):
    """A seeded standard-normal batch ``(num_samples, *shape)`` (or, for a :class:`TokenShape`,
    token ids uniform below its ``vocab``) and uniform labels ``(num_samples, *label_shape)``
    below ``num_classes``: what a probe runs on when no dataset feeds the model."""
    if num_samples < 2:
        raise ConfigError(f"num_samples: need at least 2, got {num_samples}", field="num_samples")
    g = torch.Generator().manual_seed(seed)
    if isinstance(shape, TokenShape):
        x = torch.randint(0, shape.vocab or 2, (num_samples, shape.length), generator=g)
    else:
        x = torch.randn(num_samples, *shape, generator=g)
    y = torch.randint(0, max(int(num_classes), 1), (num_samples, *label_shape), generator=g)
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


def _vocab_size(model: nn.Module) -> int | None:
    config = getattr(unwrap(model), "config", None)
    vocab = getattr(config, "vocab_size", None)
    if isinstance(vocab, int) and vocab > 0:
        return vocab
    emb = input_embedding(model)
    return getattr(emb, "num_embeddings", None)


def _batch_for(model: nn.Module, args: argparse.Namespace, shape, seed: int):
    """The probe batch of a model that has no dataset of its own: synthetic of ``shape``, the
    labels below the model's output width (one label per position when the output has a
    position axis: ``(batch, tokens, vocab)`` logits get ``(batch, tokens)`` labels)."""
    if isinstance(shape, TokenShape) and shape.vocab is None:
        vocab = _vocab_size(model)
        if vocab is None:
            raise ConfigError("--input-shape: the model has no vocabulary size (config."
                              "vocab_size or an nn.Embedding); give tokens:LENGTH,vocab=V",
                              field="input_shape")
        shape = TokenShape(shape.length, vocab)
    x, _ = synthetic_batch(shape, args.num_samples, 1, seed)
    model.eval()
    what = (f"{x.shape[1]} token ids" if isinstance(shape, TokenShape)
            else f"a batch of shape {tuple(x.shape[1:])}")
    try:
        with torch.no_grad():
            out = model(x[:2])
    except Exception as e:  # the user's model on the wrong shape: say which shape was tried
        raise ConfigError(f"probe: the model's forward on {what} raised {_one_line(e)}; give "
                          "--input-shape", field="input_shape") from e
    out = select_output(out, getattr(args, "output", None))
    classes = out.shape[-1] if out.ndim >= 2 else 1
    label_shape = tuple(out.shape[1:-1]) if out.ndim >= 3 else ()
    return synthetic_batch(shape, args.num_samples, classes, seed, label_shape)


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
    if isinstance(shape, TokenShape):
        raise ConfigError(f"--input-shape {args.input_shape}: registered models take float "
                          "inputs; token ids are for --model-file or --checkpoint models",
                          field="input_shape")
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
