"""The trace of the Hessian from Hessian-vector products: one entry point, three estimators.

:func:`estimate_trace` picks one of (each in its own module, with its paper):

- ``xtrace`` (:mod:`.xtrace`, Epperly, Tropp & Webber 2024) — the default;
- ``hutch++`` (:mod:`.hutchpp`, Meyer, Musco, Musco & Woodruff 2021);
- ``hutchinson`` (:mod:`.hutchinson`, Hutchinson 1989).

Every result carries ``trace_stderr`` (the standard error of the random part, measured from the
samples) and ``error_bound = z·trace_stderr`` (about 95% confidence for ``z = 2``); with
``budget >= dim`` the trace is exact from the basis vectors.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from pnnh.probes.hessian.hutchinson import _apply, _hutchinson
from pnnh.probes.hessian.hutchpp import _hutchpp
from pnnh.probes.hessian.xtrace import _xtrace

TRACE_METHODS = ("xtrace", "hutch++", "hutchinson")


def estimate_trace(
    matmat: Callable[[torch.Tensor], torch.Tensor], dim: int, budget: int,
    method: str = "xtrace", seed: int = 0, rel_tol: float | None = None, z: float = 2.0,
    chunk: int = 16, device: torch.device | str = "cpu",
    quadform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict:
    """Trace of a symmetric ``A`` given by ``matmat(rows) = rows @ A`` with at most ``budget``
    products.

    - ``hutchinson``: ``E[vᵀAv] = tr A``; variance ``2‖A‖_F²``-ish, error ``O(1/√n)``.
    - ``hutch++`` (Meyer, Musco, Musco & Woodruff 2021): ``Q = orth(A S)`` from ``budget/3``
      products, ``tr A = tr(QᵀAQ) + tr(PAP)`` with ``P = I − QQᵀ``; the first term is exact,
      the second is Hutchinson's on the deflated matrix (error ``O(1/n)`` for PSD ``A``).
    - ``xtrace`` (Epperly, Tropp & Webber 2024): every test vector serves both the low-rank
      sketch and the residual estimate, by leave-one-out (:func:`xtrace_estimates`).

    With ``budget >= dim`` the trace is exact from the basis vectors (``dim`` products).
    ``quadform(rows)``, when given, supplies Hutchinson's ``vᵀAv`` directly (e.g. by
    forward-over-forward AD, cheaper than ``v·(Av)``). Returns ``trace``, ``trace_stderr``
    (standard error of the random part), ``samples`` (the products used) and ``converged``
    (``z·stderr <= rel_tol·|trace|``).
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    budget = max(2, int(budget))
    if budget >= dim:  # cheaper to be exact: Σ_j e_jᵀ A e_j
        eye = torch.eye(dim, dtype=torch.float64, device=device)
        t = float(sum(float(torch.diagonal(_apply(matmat, eye[i:i + chunk], chunk)[:, i:i + chunk]
                                           ).sum()) for i in range(0, dim, chunk)))
        return {"trace": t, "trace_stderr": 0.0, "samples": dim, "converged": True,
                "trace_method": "exact (basis vectors)", "error_bound": 0.0, "z": z}
    if method == "xtrace":
        out = _xtrace(matmat, dim, budget, gen, rel_tol, z, chunk, device)
    elif method == "hutch++":
        out = _hutchpp(matmat, dim, budget, gen, rel_tol, z, chunk, device, quadform=quadform)
    else:
        out = _hutchinson(matmat, dim, budget, gen, rel_tol, z, chunk, device,
                          quadform=quadform)
    out.update(trace_method=method, error_bound=z * out["trace_stderr"], z=z)
    return out
