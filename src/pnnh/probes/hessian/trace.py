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
from pnnh.probes.hessian.memory import columns
from pnnh.probes.hessian.xtrace import _xtrace

TRACE_METHODS = ("xtrace", "hutch++", "hutchinson")
#: float64 columns of ``dim`` each estimator holds at its peak, per sketch column or probe
#: (XTrace: Ω, Y, Q, Z and the copies made when they grow; Hutch++: S, AS, Q and QR's
#: workspace; Hutchinson: the probes, their products and the deflated copies)
COPIES = {"xtrace": 8, "hutch++": 5, "hutchinson": 4}
MIN_SKETCH = 8  # Hutch++ with a smaller sketch than this falls back to Hutchinson


def plan_trace(method: str, dim: int, budget: int, chunk: int,
               max_memory: int | None) -> tuple[str, int, int | None, str | None]:
    """What fits ``max_memory`` bytes: ``(method to run, probes per call, Hutch++'s sketch
    size or None, why the method changed or None)``. XTrace runs when its whole sketch of
    ``budget/2`` columns fits; else Hutch++ with the sketch that fits (``budget/3`` columns at
    most, :data:`MIN_SKETCH` at least), else Hutchinson, whose probes stream ``chunk`` at a
    time (a chunk cut to fit too). ``None``: no cap, the method as asked."""
    if max_memory is None:
        return method, chunk, None, None
    chunk = max(1, min(chunk, columns(max_memory, dim, 8, COPIES["hutchinson"])))
    gib = max_memory / 2**30
    need = lambda name, m: COPIES[name] * m * dim * 8 / 2**30  # noqa: E731  GiB
    why = None
    if method == "xtrace":
        m = min(budget // 2, dim - 1)
        if columns(max_memory, dim, 8, COPIES["xtrace"]) >= m:
            return method, chunk, None, None
        why = f"xtrace's sketch of {m} columns needs {need('xtrace', m):.3g} GiB"
        method = "hutch++"
    if method == "hutch++":
        k = min(budget // 3, dim - 1)
        fit = columns(max_memory, dim, 8, COPIES["hutch++"])
        if fit >= k and why is None:
            return method, chunk, None, None
        if fit >= MIN_SKETCH:
            return method, chunk, min(k, fit), (
                f"{why or 'hutch++'}; hutch++ with a sketch of {min(k, fit)} columns "
                f"({need('hutch++', min(k, fit)):.3g} GiB) fits max_memory {gib:.3g} GiB")
        why = why or f"hutch++'s sketch of {k} columns needs {need('hutch++', k):.3g} GiB"
        return "hutchinson", chunk, None, (
            f"{why}, over max_memory {gib:.3g} GiB: hutchinson, {chunk} probes at a time")
    return method, chunk, None, None


def estimate_trace(
    matmat: Callable[[torch.Tensor], torch.Tensor], dim: int, budget: int,
    method: str = "xtrace", seed: int = 0, rel_tol: float | None = None, z: float = 2.0,
    chunk: int = 16, device: torch.device | str = "cpu",
    quadform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    max_memory: int | None = None,
    on_estimate: Callable[[float, float], None] | None = None,
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
    (``z·stderr <= rel_tol·|trace|``). ``max_memory`` (bytes) caps what the estimator holds
    (:func:`plan_trace`): ``trace_method`` is then the method that ran and ``trace_plan`` says
    why it is not the one asked for. ``on_estimate(trace, stderr)`` sees every intermediate
    estimate (a progress bar).
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    budget = max(2, int(budget))
    asked = method
    method, chunk, sketch, why = plan_trace(method, dim, budget, chunk, max_memory)
    rows = None if max_memory is None else chunk
    if budget >= dim:  # cheaper to be exact: Σ_j e_jᵀ A e_j
        eye = torch.eye(dim, dtype=torch.float64, device=device)
        t = float(sum(float(torch.diagonal(_apply(matmat, eye[i:i + chunk], chunk)[:, i:i + chunk]
                                           ).sum()) for i in range(0, dim, chunk)))
        return {"trace": t, "trace_stderr": 0.0, "samples": dim, "converged": True,
                "trace_method": "exact (basis vectors)", "error_bound": 0.0, "z": z}
    if method == "xtrace":
        out = _xtrace(matmat, dim, budget, gen, rel_tol, z, chunk, device, on_estimate)
    elif method == "hutch++":
        out = _hutchpp(matmat, dim, budget, gen, rel_tol, z, chunk, device, quadform=quadform,
                       k=sketch, max_rows=rows, on_estimate=on_estimate)
    else:
        out = _hutchinson(matmat, dim, budget, gen, rel_tol, z, chunk, device,
                          quadform=quadform, max_rows=rows, on_estimate=on_estimate)
    out.update(trace_method=method, error_bound=z * out["trace_stderr"], z=z)
    if why is not None:
        out.update(trace_plan=why, trace_method_asked=asked)
    return out
