"""Activations with no second derivative in PyTorch, computed inside the Hessian's loss by exact
compositions that have one.

PyTorch differentiates ``hardsigmoid`` once but not its backward (``derivative for
aten::hardsigmoid_backward is not implemented``), so neither a double backward nor a
forward-over-reverse HVP runs through a model that uses it (MobileNetV3's squeeze-excitation
gates, its hard-swish in older torch). Inside the loss it is computed as::

    hardsigmoid(x) = min(max(x + 3, 0), 6) / 6
                   = where(-3 < x < 3, (x + 3) / 6, [x >= 3])

the same arithmetic on every input (``(x + 3) / 6`` is what the kernel computes between the
kinks), the same first derivative (1/6 strictly inside, 0 outside: the kernel's convention at
the kinks; PyTorch's backward kernel multiplies by a float32 1/6 even in float64, this one
divides by 6) and a second derivative, 0 almost everywhere, that autograd can take. So the loss,
its gradient and its Hessian are unchanged; only the graph has a double backward.
``hardswish`` (``x · hardsigmoid(x)``) is differentiable twice in the PyTorch versions pnnh
supports and is left alone; a test checks both against a float64 finite difference.

:func:`exact_substitutes` swaps ``torch.nn.functional.hardsigmoid`` for the duration of a
``with`` block (``nn.Hardsigmoid`` and every ``F.hardsigmoid(...)`` call resolve it then) and
counts the calls it served, which the operator's ``method`` reports.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F


def hardsigmoid(x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """``F.hardsigmoid`` as a ``where`` of differentiable pieces (see the module docstring)."""
    inside = (x > -3) & (x < 3)
    return torch.where(inside, (x + 3) / 6, (x >= 3).to(x.dtype))


@contextlib.contextmanager
def exact_substitutes(calls: dict[str, int] | None = None) -> Iterator[dict[str, int]]:
    """Inside the block, ``F.hardsigmoid`` is :func:`hardsigmoid`; ``calls["hardsigmoid"]``
    counts the calls it served (``calls`` is the dict given, or a new one, yielded)."""
    calls = {} if calls is None else calls
    original = F.hardsigmoid

    def counted(x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        calls["hardsigmoid"] = calls.get("hardsigmoid", 0) + 1
        return hardsigmoid(x)

    F.hardsigmoid = counted
    try:
        yield calls
    finally:
        F.hardsigmoid = original
