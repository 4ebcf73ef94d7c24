"""Projections onto matrices with equal singular values (orthogonal Procrustes).

For a matrix ``W`` with SVD ``W = U diag(s) Vᵀ``, the nearest matrix (Frobenius norm) with all
singular values equal to ``c`` is ``c · U Vᵀ`` (orthogonal Procrustes). If ``c`` is free, the
best choice is ``c = mean(s)``: ``‖U diag(s) Vᵀ − c U Vᵀ‖² = Σ (s_i − c)²`` is minimised by the
mean. Such a matrix scales every direction by the same factor, so it preserves norms up to
``c`` (paper 2: "Norm-Preservation", Procrustes ResNets).

Two ways to compute ``U Vᵀ``:

- :func:`procrustes` — exact, by SVD (batched over leading dimensions);
- :func:`newton_schulz` — matmuls only, the cubic iteration ``X ← 1.5 X − 0.5 X XᵀX`` on
  ``X₀ = W / ‖W‖_F``, which converges to ``U Vᵀ`` when all singular values of ``X₀`` lie in
  ``(0, √3)``. A few iterations suffice when ``W`` is already near orthogonal (as a coder
  is after one optimizer step), which is what makes a per-step projection cheap.
"""

from __future__ import annotations

import torch


def procrustes(w: torch.Tensor, scale: float | str | None = 1.0) -> torch.Tensor:
    """Nearest matrix to ``w`` (per trailing 2-D slice) whose singular values are all equal.

    ``scale=1.0`` gives the nearest (semi-)orthogonal matrix ``U Vᵀ``; ``scale="mean"`` uses
    the mean singular value (the nearest matrix with equal, free singular values); a float
    ``c`` gives ``c · U Vᵀ``. Works on ``(..., m, n)`` tensors.
    """
    # float64: LAPACK's float32 SVD can fail to converge on near-orthogonal matrices
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    q = u @ vh
    if scale == "mean":
        q = q * s.mean(dim=-1, keepdim=True).unsqueeze(-1)
    elif scale is not None and scale != 1.0:
        q = q * float(scale)
    return q.to(w.dtype)


def newton_schulz(w: torch.Tensor, steps: int = 5, scale: float | str | None = 1.0) -> torch.Tensor:
    """Approximate ``U Vᵀ`` of ``w`` with ``steps`` Newton–Schulz iterations (matmuls only).

    Batched over leading dimensions. ``scale`` as in :func:`procrustes` (``"mean"`` uses the
    mean singular value estimated as ``tr(Q̂ᵀ W) / min(m, n)``, exact when ``Q̂ = U Vᵀ``).
    """
    x = w.float()
    transpose = x.shape[-2] > x.shape[-1]
    if transpose:
        x = x.transpose(-2, -1)
    k = min(x.shape[-2], x.shape[-1])
    # Start with σ_max(X₀) just under 1: divide by a power-iteration estimate of σ_max
    # (a lower bound) times 1.1, capped by ‖W‖_F (an upper bound). Convergence needs
    # σ_max(X₀) < √3, i.e. an estimate within a factor 1.57 of σ_max: a few power steps give it.
    v = torch.ones(x.shape[:-2] + (x.shape[-1], 1), dtype=x.dtype, device=x.device)
    for _ in range(6):
        v = x.transpose(-2, -1) @ (x @ v)
        v = v / torch.linalg.vector_norm(v, dim=-2, keepdim=True).clamp_min(1e-30)
    sigma = torch.linalg.vector_norm(x @ v, dim=-2, keepdim=True)
    fro = torch.linalg.matrix_norm(x, keepdim=True)
    x = x / torch.minimum(1.1 * sigma, fro).clamp_min(1e-12)
    for _ in range(steps):
        x = 1.5 * x - 0.5 * x @ x.transpose(-2, -1) @ x
    if transpose:
        x = x.transpose(-2, -1)
    if scale == "mean":
        c = (x * w.float()).sum(dim=(-2, -1), keepdim=True) / k
        x = x * c
    elif scale is not None and scale != 1.0:
        x = x * float(scale)
    return x.to(w.dtype)


def singular_value_spread(w: torch.Tensor) -> float:
    """``σ_max / σ_min − 1`` of ``w`` (0 for a matrix with equal singular values)."""
    s = torch.linalg.svdvals(w.detach().float().reshape(w.shape[0], -1))
    return float(s.max() / s.min().clamp_min(1e-12) - 1)
