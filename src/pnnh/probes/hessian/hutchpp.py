"""Hutch++: Meyer, Musco, Musco & Woodruff, "Hutch++: optimal stochastic trace estimation",
SOSA (2021).

``Q = orth(A S)`` from ``budget/3`` products with Rademacher ``S``; then
``tr A = tr(QᵀAQ) + tr(PAP)`` with ``P = I − QQᵀ``: the first term is exact, the second is
Hutchinson's on the deflated matrix. For PSD ``A``, ``n`` products give relative error
``O(1/n)`` with constant probability, against Hutchinson's ``O(1/√n)``.
"""

from __future__ import annotations

import torch

from pnnh.probes.hessian.hutchinson import _apply, _hutchinson, _rademacher


def _hutchpp(matmat, dim: int, budget: int, gen, rel_tol, z: float, chunk: int, device,
             quadform=None, k: int | None = None, max_rows: int | None = None,
             on_estimate=None) -> dict:
    """Hutch++ with at most ``budget`` products: ``k`` (default ``budget/3``) for the sketch,
    as many for ``AQ``, the rest for Hutchinson on the deflated matrix. Any ``k >= 1`` keeps
    the estimator unbiased; a smaller sketch (the memory cap) only deflates less."""
    k = max(1, min(budget // 3 if k is None else k, dim - 1))
    q = torch.linalg.qr(_apply(matmat, _rademacher(k, dim, gen, device), chunk).T)[0]
    top = float(torch.trace(q.T @ _apply(matmat, q.T, chunk).T))
    out = _hutchinson(matmat, dim, max(2, budget - 2 * k), gen, rel_tol, z, chunk, device,
                      basis=(q, top), quadform=quadform, max_rows=max_rows,
                      on_estimate=on_estimate)
    out["samples"] += 2 * k
    return out
