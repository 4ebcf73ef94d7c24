"""The memory budget of the curvature estimators: how many vectors and HVPs fit at once.

A Hessian of ``P`` parameters costs ``P`` numbers per vector: 100 MB in float32 for a
ResNet-50 (25.6M parameters). The estimators would hold many at once — a Lanczos basis of up
to ``max_iter`` vectors, XTrace's four ``P × m`` sketches, batched HVPs whose graphs grow with
the batch of vectors — so each sizes what it holds by one budget, ``max_memory`` bytes
(default :data:`MAX_MEMORY`), on top of the model, its data and one HVP's graph:

- Lanczos keeps at most ``max_memory / (P·itemsize)`` vectors, in the model's dtype; past
  that it re-orthogonalises against the latest ones only (:func:`~.lanczos.lanczos`);
- the trace estimators hold ``c`` columns of ``8P`` bytes (float64) with ``c`` from
  :func:`columns`: XTrace when its whole sketch fits, else Hutch++ with the sketch that
  fits, else Hutchinson, streaming (:func:`~.trace.plan_trace`);
- batched HVPs go ``max_memory / (cost of one)`` at a time (:func:`hvp_bytes`), the cost of
  one estimated from the parameter count and the activations of one sample.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from pnnh.errors import ConfigError

#: bytes for the estimators' vectors and batched HVPs: 1 GiB keeps a torchvision ResNet-50
#: (8 samples of 3x64x64) under 4 GB in all (docs/BENCHMARKS.md)
MAX_MEMORY = 2**30
#: an HVP's graph holds about this many copies of the forward activations (forward, gradient
#: graph, its backward), measured on ResNet-18/50: see docs/BENCHMARKS.md
ACTIVATION_COPIES = 6
_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "m": 2**20, "mb": 2**20, "g": 2**30,
          "gb": 2**30, "t": 2**40, "tb": 2**40}


def parse_memory(text: str | float | int | None) -> int:
    """Bytes from ``"2G"``, ``"500MB"``, ``"1.5gb"`` or a number of bytes (binary units:
    ``1G = 2³⁰``); ``None`` is the default :data:`MAX_MEMORY`."""
    if text is None:
        return MAX_MEMORY
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
        if m is None or m.group(2).lower() not in _UNITS:
            raise ConfigError(f"max-memory: a size such as 2G, 500M or 1.5GB, got {text!r}",
                              field="max_memory")
        value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if not value > 0:
        raise ConfigError(f"max-memory: must be positive, got {text!r}", field="max_memory")
    return int(value)


def columns(max_memory: int, dim: int, itemsize: int = 8, copies: int = 1) -> int:
    """How many vectors of ``dim`` numbers fit ``copies`` times into ``max_memory`` bytes."""
    return int(max_memory // max(1, copies * dim * itemsize))


def activation_bytes(forward, model: nn.Module, sample: torch.Tensor) -> int:
    """Bytes of the outputs of every leaf module of ``model`` while ``forward(sample)`` runs
    (the forward's activations; ``forward`` is ``model`` or a functional call of it)."""
    total = 0

    def hook(_module, _inputs, output):
        nonlocal total
        outs = output if isinstance(output, (tuple, list)) else (output,)
        total += sum(o.numel() * o.element_size() for o in outs if torch.is_tensor(o))

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        with torch.no_grad():
            forward(sample)
    finally:
        for h in handles:
            h.remove()
    return total


def hvp_bytes(dim: int, itemsize: int, samples: int, per_sample_activations: int) -> int:
    """Estimated extra memory of one more vector in a batched HVP: its graph's activations
    (:data:`ACTIVATION_COPIES` copies of the forward's on ``samples`` samples) plus the
    vector, its tangent/cotangent and its product (4 vectors of ``dim``)."""
    return ACTIVATION_COPIES * samples * per_sample_activations + 4 * dim * itemsize
