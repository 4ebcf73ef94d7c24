"""XTrace: Epperly, Tropp & Webber, "XTrace: making the most of every sample in stochastic
trace estimation", SIAM J. Matrix Anal. Appl. 45 (2024) — the "improved" variant.

With ``m`` test vectors (``2m`` products) every vector serves both a low-rank sketch (whose
trace is exact) and the residual estimate, by leave-one-out (:func:`xtrace_estimates`). For a
PSD ``A`` its error is ``O(1/m)``-like (as Hutch++'s), and the spread of the ``m`` exchangeable
estimates gives a measured standard error. curvlinops' ``trace/epperly2024xtrace.py`` is the
same algorithm.
"""

from __future__ import annotations

import torch

from pnnh.probes.hessian.hutchinson import _apply, _mean_stderr, _sphere, _stop


def xtrace_estimates(om: torch.Tensor, y: torch.Tensor, q: torch.Tensor, r: torch.Tensor,
                     z: torch.Tensor) -> torch.Tensor:
    """The ``m`` leave-one-out estimates of XTrace (Epperly, Tropp & Webber 2024, "improved").

    Columns: test vectors ``Ω`` (``n×m``, on the sphere of radius ``√n``), ``Y = AΩ = QR``
    and ``Z = AQ``. Estimate ``j`` is ``tr(Q₋ⱼᵀAQ₋ⱼ) + ωⱼᵀ(I−Q₋ⱼQ₋ⱼᵀ)A(I−Q₋ⱼQ₋ⱼᵀ)ωⱼ``
    (rescaled), with ``Q₋ⱼ`` an orthonormal basis of ``Y`` without column ``j``, evaluated in
    closed form from ``S = normalised columns of R⁻ᵀ`` (no extra products with ``A``); their
    mean is the XTrace estimate and their spread gives its standard error.
    """
    n, m = om.shape
    dp = lambda a, b: (a * b).sum(0)  # noqa: E731  diag(aᵀb)
    w = q.T @ om
    s = torch.linalg.inv(r).T
    s = s / s.norm(dim=0, keepdim=True)
    scale = (n - m + 1) / (n - w.norm(dim=0) ** 2 + (dp(s, w).abs() * s.norm(dim=0)) ** 2)
    h = q.T @ z
    hw = h @ w
    t = z.T @ om
    dsw, dshs = dp(s, w), dp(s, h @ s)
    core = (-dp(t, w) + dp(w, hw) + dsw * dp(s, r - hw) + dsw**2 * dshs
            + dp(t - h.T @ w, s) * dsw)
    return torch.trace(h) - dshs + core * scale


def _xtrace(matmat, dim: int, budget: int, gen, rel_tol, z: float, chunk: int, device,
            on_estimate=None) -> dict:
    """Adaptive XTrace: ``m`` test vectors cost ``2m`` products; ``m`` doubles until the
    stopping rule holds or the budget is spent. The sketch is extended, not redrawn: with
    ``[Y, Y'] = Q'R'`` the old ``Z = AQ`` is reused as ``Z U`` (``U = QᵀQ'_{:, :m}``, the
    rotation between two bases of one subspace), so only the new basis columns cost products."""
    m_max = max(2, min(budget // 2, dim - 1))
    om = y = q = zq = None
    m = min(8, m_max)
    while True:
        new = _sphere(m - (0 if om is None else om.shape[1]), dim, gen, device).T
        ynew = _apply(matmat, new.T, chunk).T
        om = new if om is None else torch.cat([om, new], 1)
        y = ynew if y is None else torch.cat([y, ynew], 1)
        qn, rn = torch.linalg.qr(y)
        k = 0 if q is None else q.shape[1]
        zold = zq @ (q.T @ qn[:, :k]) if k else torch.empty(dim, 0, dtype=y.dtype, device=device)
        zq = torch.cat([zold, _apply(matmat, qn[:, k:].T, chunk).T], 1)
        q = qn
        ests = xtrace_estimates(om, y, q, rn, zq)
        t, err = _mean_stderr(ests)
        if on_estimate is not None:
            on_estimate(t, err)
        if _stop(t, err, rel_tol, z) or m >= m_max:
            return {"trace": t, "trace_stderr": err, "samples": 2 * m,
                    "converged": _stop(t, err, rel_tol, z)}
        m = min(2 * m, m_max)
