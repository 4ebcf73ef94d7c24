"""Curvature of the loss: Hessian-vector products, extreme eigenvalues, trace, spectral density.

The probe ``pnnh probe hessian`` (``NAME``, ``DESCRIPTION``, ``add_cli_arguments``, ``prepare``,
``run``: the contract of :mod:`pnnh.probes`) and the library behind it, one module per
algorithm, each readable on its own with its paper and its error bound:

- :mod:`.operator` — :class:`HessianOperator`: the Hessian of ``loss_fn(model(x), y)`` as an
  operator, one primitive (the HVP, double backward over a kept graph or forward-over-reverse,
  exact over one batch or a whole data loader), BatchNorm folding, the TF32 guard
  (:func:`full_float32`), parameter selection and the losses. The estimators below are its
  methods: ``extreme_eigenvalues``, ``trace``, ``spectral_density``, ``dense``.
- :mod:`.lanczos` — :func:`lanczos` with full or partial re-orthogonalisation (Simon 1984,
  residuals measured at the stop) and :func:`ritz_error_bounds` (residual, guaranteed, or
  ``r²/gap``).
- :mod:`.trace` — :func:`estimate_trace` over :mod:`.xtrace` (Epperly, Tropp & Webber 2024),
  :mod:`.hutchpp` (Meyer et al. 2021) and :mod:`.hutchinson` (Hutchinson 1989), each with a
  measured standard error and a stopping rule ``z·stderr <= rel_tol·|trace|``.
- :mod:`.density` — stochastic Lanczos quadrature: :func:`slq_quadrature` (Gauss or Laurie's
  averaged rule) and :func:`slq_density`.
- :mod:`.blocks` — :func:`block_curvature`: extremes and trace of diagonal blocks ``H_BB``.
- :mod:`.summary` — :func:`hessian_summary` and :func:`condition_numbers`: what the probe
  reports, exact (dense ``eigvalsh``) on small models.
- :mod:`.cli` — the probe's flags, its run and the spectrum plot.

``pnnh probe hessian`` writes ``hessian.json`` (``lambda_max``, ``lambda_min``, ``trace``,
``condition_number``, ``condition_number_positive``, ``method``, ``hvp``, ...), a spectrum PNG
and, with ``--blocks``, ``hessian_blocks.csv/json``.
"""

from __future__ import annotations

from pnnh.probes.hessian.blocks import block_curvature, parse_blocks
from pnnh.probes.hessian.cli import add_cli_arguments, plot_spectrum, prepare, run
from pnnh.probes.hessian.density import QUADRATURES, slq_density, slq_quadrature
from pnnh.probes.hessian.hutchinson import _hutchinson
from pnnh.probes.hessian.lanczos import _tridiagonal_eigh, lanczos, ritz_error_bounds
from pnnh.probes.hessian.operator import (
    BATCHED_CPU_DIM,
    BLOCK_FWD_REV,
    HVP_KINDS,
    HVP_MODES,
    LOSSES,
    Batch,
    HessianOperator,
    LossFn,
    _tf32_knobs,
    full_float32,
    mse_loss,
    select_parameters,
)
from pnnh.probes.hessian.summary import HessianSummary, condition_numbers, hessian_summary
from pnnh.probes.hessian.trace import TRACE_METHODS, estimate_trace
from pnnh.probes.hessian.xtrace import _xtrace, xtrace_estimates

NAME = "hessian"
DESCRIPTION = "Hessian extreme eigenvalues, trace, spectrum, condition number"

__all__ = [
    "BATCHED_CPU_DIM", "BLOCK_FWD_REV", "DESCRIPTION", "HVP_KINDS", "HVP_MODES", "LOSSES", "NAME",
    "QUADRATURES", "TRACE_METHODS", "Batch", "HessianOperator", "HessianSummary", "LossFn",
    "_hutchinson", "_tf32_knobs", "_tridiagonal_eigh", "_xtrace", "add_cli_arguments",
    "block_curvature", "condition_numbers", "estimate_trace", "full_float32", "hessian_summary",
    "lanczos", "mse_loss", "parse_blocks", "plot_spectrum", "prepare", "ritz_error_bounds", "run",
    "select_parameters", "slq_density", "slq_quadrature", "xtrace_estimates",
]
