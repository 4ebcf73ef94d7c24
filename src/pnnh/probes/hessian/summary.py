"""What ``pnnh probe hessian`` reports about one model: extremes, trace, density, condition numbers.

:func:`hessian_summary` takes the exact dense Hessian (``eigvalsh``) for small models and the
estimators otherwise: Lanczos extremes (:mod:`.lanczos`, relative Ritz residual ``<= tol``), the
trace (:mod:`.trace`, with its standard error) and the SLQ density (:mod:`.density`).
:func:`condition_numbers` states its zero threshold: ``condition_number = max|λ| / min|λ|``
over the non-zero spectrum ``|λ| > tol·max|λ|``, ``condition_number_positive = λ_max / λ_min``
over the positive spectrum.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pnnh.probes.hessian.operator import HessianOperator


def condition_numbers(eigenvalues: torch.Tensor, tol: float = 1e-8) -> dict:
    """Condition numbers of a spectrum, with the zero threshold stated.

    - ``condition_number = max|λ| / min|λ|`` over ``|λ| > tol·max|λ|`` (the non-zero spectrum;
      an indefinite Hessian, e.g. at a saddle, still has one);
    - ``condition_number_positive = λ_max / λ_min`` over the positive spectrum
      ``λ > tol·max|λ|`` (``None`` when no eigenvalue is positive).

    A zero Hessian (``max|λ| = 0``) has neither: both are ``None``.
    """
    lam = eigenvalues.double().flatten()
    amax = float(lam.abs().max()) if lam.numel() else 0.0
    out = {"zero_tol": tol, "num_zero": int(lam.numel()), "num_negative": 0, "num_positive": 0}
    if amax == 0.0:
        out.update(condition_number=None, condition_number_positive=None)
        return out
    thr = tol * amax
    nz = lam[lam.abs() > thr]
    pos = lam[lam > thr]
    out.update(
        condition_number=float(nz.abs().max() / nz.abs().min()),
        condition_number_positive=float(pos.max() / pos.min()) if pos.numel() else None,
        num_zero=int(lam.numel() - nz.numel()),
        num_negative=int((lam < -thr).sum()),
        num_positive=int(pos.numel()),
    )
    return out


@dataclass
class HessianSummary:
    lambda_max: float
    lambda_min: float
    trace: float
    trace_stderr: float
    condition_number: float | None
    condition_number_positive: float | None
    method: str
    num_params: int
    extra: dict

    def to_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "extra"}
        d.update(self.extra)
        return d


def hessian_summary(
    op: HessianOperator,
    dense: str = "auto",
    dense_limit: int = 5000,
    tol: float = 1e-6,
    zero_tol: float = 1e-8,
    hutchinson_samples: int = 100,
    trace_method: str = "xtrace",
    slq_runs: int = 5,
    slq_steps: int = 40,
    max_iter: int = 200,
    seed: int = 0,
    slq_quadrature: str = "averaged",
) -> tuple[HessianSummary, dict]:
    """Everything ``pnnh probe hessian`` reports, exact where the model is small enough.

    ``dense="auto"`` uses the exact Hessian for ``dim <= dense_limit`` ("always"/"never"
    force it). Returns the summary and the spectrum for plotting: ``{"eigenvalues": ...}``
    (exact) or ``{"nodes": ..., "weights": ...}`` (SLQ).
    """
    use_dense = dense == "always" or (dense == "auto" and op.dim <= dense_limit)
    if use_dense:
        lam = torch.linalg.eigvalsh(op.dense().double())
        cn = condition_numbers(lam, zero_tol)
        summary = HessianSummary(
            lambda_max=float(lam[-1]), lambda_min=float(lam[0]), trace=float(lam.sum()),
            trace_stderr=0.0, condition_number=cn["condition_number"],
            condition_number_positive=cn["condition_number_positive"],
            method=(f"exact dense Hessian ({op.dim} params, eigvalsh); HVPs: {op.hvp_method}; "
                    f"zero threshold |λ| <= {zero_tol:g}·max|λ|"),
            num_params=op.dim,
            extra={"hvp": op.hvp_kind, "zero_tol": zero_tol, "num_zero": cn["num_zero"],
                   "num_negative": cn["num_negative"], "num_positive": cn["num_positive"],
                   "num_samples": op.num_samples, "batchnorm_folded": len(op.folded),
                   "world_size": op.world_size},
        )
        return summary, {"eigenvalues": lam}
    ext = op.extreme_eigenvalues(tol=tol, max_iter=max_iter, seed=seed)
    tr = op.trace(hutchinson_samples, seed=seed, method=trace_method)
    lmax, lmin = ext["lambda_max"], ext["lambda_min"]
    amax = max(abs(lmax), abs(lmin))
    # From the extremes alone: the positive-spectrum ratio when the Hessian is positive
    # definite; the |λ| ratio needs the smallest |λ|, an interior eigenvalue, when indefinite.
    pd = amax > 0 and lmin > zero_tol * amax
    spec = op.spectral_density(slq_runs, slq_steps, seed=seed, quadrature=slq_quadrature)
    summary = HessianSummary(
        lambda_max=lmax, lambda_min=lmin, trace=tr["trace"], trace_stderr=tr["trace_stderr"],
        condition_number=lmax / lmin if pd else None,
        condition_number_positive=lmax / lmin if pd else None,
        method=(f"Lanczos (tol {tol:g} relative Ritz residual, "
                f"{ext['iterations']} steps, converged={ext['converged']}, "
                f"re-orthogonalisation {ext['reorthogonalisation']}); {tr['trace_method']} trace "
                f"({tr['samples']} HVPs); SLQ density ({slq_runs}x{slq_steps}, {slq_quadrature} "
                f"quadrature); "
                f"condition numbers only when λmin > {zero_tol:g}·max|λ| (else null: the "
                f"smallest |λ| is interior to the spectrum); HVPs: {op.hvp_method}"),
        num_params=op.dim,
        extra={"hvp": op.hvp_kind, "zero_tol": zero_tol, "lanczos_tol": tol,
               "error_bound_max": ext["error_bound_max"],
               "error_bound_min": ext["error_bound_min"],
               "rounding_floor": ext["rounding_floor"],
               **({"precision_note": ext["precision_note"]} if ext["precision_note"] else {}),
               "lanczos_iterations": ext["iterations"],
               "lanczos_converged": ext["converged"],
               "lanczos_reorthogonalisation": ext["reorthogonalisation"],
               "hutchinson_samples": tr["samples"],
               "trace_method": tr["trace_method"], "slq_quadrature": slq_quadrature,
               "num_samples": op.num_samples, "batchnorm_folded": len(op.folded),
               "world_size": op.world_size,
               "max_memory": op.max_memory, "lanczos_vectors": ext["lanczos_vectors"],
               **({"trace_plan": tr["trace_plan"]} if "trace_plan" in tr else {})},
    )
    return summary, spec
