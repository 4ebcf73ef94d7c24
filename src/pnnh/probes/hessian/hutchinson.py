"""Hutchinson's trace estimator, and the probe vectors and stopping rule the estimators share.

Hutchinson, "A stochastic estimator of the trace of the influence matrix for Laplacian
smoothing splines" (1989); Avron & Toledo (2011) for its analysis: for Rademacher ``v``,
``E[vᵀAv] = tr A`` and ``Var[vᵀAv] = 2(‖A‖_F² − Σ_i A_ii²)``, so the mean of ``n`` probes has
standard error ``O(‖A‖_F/√n)``. The estimators stop once ``z·stderr <= rel_tol·|trace|``
(:func:`_stop`: an error bound at about 95% confidence for ``z = 2``), with the standard error
of the probes measured, not assumed.
"""

from __future__ import annotations

import math

import torch


def _rademacher(k: int, dim: int, gen: torch.Generator, device) -> torch.Tensor:
    """``k`` rows of independent ±1 (in place: one ``k × dim`` float64 buffer)."""
    return torch.randint(0, 2, (k, dim), generator=gen, dtype=torch.float64).mul_(2).sub_(1).to(
        device)


def _sphere(k: int, dim: int, gen: torch.Generator, device) -> torch.Tensor:
    """``k`` rows uniform on the sphere of radius ``√dim`` (XTrace's "improved" test vectors)."""
    g = torch.randn(k, dim, generator=gen, dtype=torch.float64)
    return (g * (math.sqrt(dim) / g.norm(dim=1, keepdim=True))).to(device)


def _mean_stderr(vals: torch.Tensor) -> tuple[float, float]:
    n = vals.numel()
    return float(vals.mean()), (float(vals.std() / math.sqrt(n)) if n > 1 else float("inf"))


def _stop(t: float, err: float, rel_tol: float | None, z: float) -> bool:
    return rel_tol is not None and z * err <= rel_tol * abs(t)


def _apply(matmat, rows: torch.Tensor, chunk: int) -> torch.Tensor:
    """``A`` applied to every row of ``rows`` (``chunk`` rows per batched call), in float64."""
    return torch.cat([matmat(rows[i:i + chunk]).double() for i in range(0, rows.shape[0], chunk)])


def _hutchinson(matmat, dim, budget, gen, rel_tol, z, chunk, device, basis=None,
                quadform=None, max_rows: int | None = None, on_estimate=None) -> dict:
    """``(1/n) Σ vᵀ P A P v`` over Rademacher ``v`` with ``P = I − QQᵀ`` (``P = I`` without a
    basis), ``chunk`` probes per batched call, stopping when ``z·stderr <= rel_tol·|total|``.
    ``quadform(rows)``, when given, returns ``vᵀAv`` per row directly (else ``v·(Av)``); without
    a stopping rule all probes go to it at once, or ``max_rows`` at a time (the memory cap)."""
    if quadform is not None and rel_tol is None:
        chunk = budget if max_rows is None else max(1, min(budget, max_rows))
    base = 0.0 if basis is None else basis[1]
    vals: list[float] = []
    t, err = base, float("inf")
    while len(vals) < budget:
        v = _rademacher(min(chunk, budget - len(vals)), dim, gen, device)
        if basis is not None:
            v = v - (v @ basis[0]) @ basis[0].T
        vals += (quadform(v) if quadform is not None
                 else (v * matmat(v).double()).sum(1)).tolist()
        t, err = _mean_stderr(torch.tensor(vals, dtype=torch.float64))
        t += base
        if on_estimate is not None:
            on_estimate(t, err)
        if len(vals) >= 8 and _stop(t, err, rel_tol, z):
            break
    return {"trace": t, "trace_stderr": err, "samples": len(vals),
            "converged": _stop(t, err, rel_tol, z)}
