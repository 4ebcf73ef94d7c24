"""``pnnh probe hessian``: its flags, its run over the targets, and the spectrum plot.

Writes ``hessian.json`` (one record per model: ``lambda_max``, ``lambda_min``, ``trace``,
``condition_number``, ``condition_number_positive``, ``method``, ``hvp``, ...), the spectrum PNG
``hessian_spectrum.png`` and, with ``--blocks``, ``hessian_blocks.csv/json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pnnh.errors import ConfigError
from pnnh.io import save_figure, write_records
from pnnh.probes.common import ProbeResult, ProbeTarget, select_output
from pnnh.probes.hessian.blocks import block_curvature
from pnnh.probes.hessian.density import QUADRATURES, slq_density
from pnnh.probes.hessian.memory import parse_memory
from pnnh.probes.hessian.operator import HVP_MODES, LOSSES, HessianOperator, _world_size
from pnnh.probes.hessian.summary import hessian_summary
from pnnh.probes.hessian.trace import TRACE_METHODS


def plot_spectrum(spectra: dict[str, dict], path: str | Path) -> Path:
    """One curve per model: a histogram of exact eigenvalues or the SLQ density (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, spec in spectra.items():
        if "eigenvalues" in spec:
            lam = spec["eigenvalues"].double().cpu().numpy()
            ax.hist(lam, bins=80, density=True, histtype="step", label=f"{label} (exact)")
        else:
            lo = min(float(n.min()) for n in spec["nodes"])
            hi = max(float(n.max()) for n in spec["nodes"])
            pad = 0.05 * (hi - lo or 1.0)
            grid = torch.linspace(lo - pad, hi + pad, 400, dtype=torch.float64)
            dens = slq_density(spec["nodes"], spec["weights"], grid)
            ax.plot(grid.numpy(), dens.clamp_min(1e-12).numpy(), label=f"{label} (SLQ)")
    ax.set_yscale("log")
    ax.set_xlabel("eigenvalue λ of the loss Hessian")
    ax.set_ylabel("spectral density")
    ax.set_title("Hessian spectrum")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)


def add_cli_arguments(p: argparse.ArgumentParser) -> None:
    a = p.add_argument
    a("--shortcut", type=int, help="shortcut depth k for shortcut_linear/shortcut_mlp (0 = none)")
    a("--init", choices=["zero", "small", "xavier", "orthogonal"],
      help="initialisation for shortcut_linear/shortcut_mlp")
    a("--init-scale", type=float, help="scale s of the `small` init")
    a("--loss", choices=sorted(LOSSES), default="ce", help="ce (classification) or mse")
    a("--params", default="all",
      help="parameters to differentiate: all, or comma-separated name prefixes (e.g. blocks)")
    a("--dense", choices=["auto", "always", "never"], default="auto",
      help="exact dense Hessian: auto = when the parameter count is <= --dense-limit")
    a("--dense-limit", type=int, default=5000)
    a("--tol", type=float, default=None,
      help="Lanczos relative error tolerance (default 1e-5, 1e-6 with --float64: each above "
           "what the vectors' rounding allows; a smaller one is raised to that floor, said so)")
    a("--float64", action="store_true",
      help="the model and batch in float64: HVPs and Lanczos vectors below float32's rounding "
           "floor (~2e-6 relative), at twice the memory")
    a("--zero-tol", type=float, default=1e-8,
      help="eigenvalues with |λ| <= zero_tol·max|λ| count as zero in condition numbers")
    a("--max-iter", type=int, default=200, help="Lanczos steps at most")
    a("--hutchinson-samples", type=int, default=100,
      help="HVPs for the trace estimate (any --trace-method)")
    a("--trace-method", choices=list(TRACE_METHODS), default="xtrace",
      help="stochastic trace estimator (xtrace: exact on the sketched spectrum, stated error)")
    a("--hvp", choices=list(HVP_MODES), default="auto",
      help="HVP kind: auto = double backward over a kept graph, falling back where a "
           "derivative is missing; fwd-rev keeps no graph between HVPs (less memory)")
    a("--no-fold-batchnorm", dest="fold_batchnorm", action="store_false",
      help="keep eval-mode BatchNorms as they are (by default each is folded into the layer "
           "before it inside the loss: the same Hessian, a cheaper graph)")
    a("--blocks", default=None,
      help="per-block curvature, e.g. 'stage1=blocks.0,blocks.1,blocks.2;head': λmax, λmin, "
           "trace of each diagonal Hessian block, in hessian_blocks.csv/json")
    a("--batch-size", type=int, default=None,
      help="the --num-samples in batches of this many (default: one batch): the loss is the "
           "exact mean over all of them, one batch's graph in memory at a time (each HVP "
           "then recomputes every batch's forward and gradient); under torchrun each rank "
           "batches its own shard")
    a("--max-memory", default="1G",
      help="memory for the estimators' vectors and batched HVPs beyond the model and one "
           "HVP's graph (e.g. 2G, 500M): Lanczos keeps the vectors that fit, the trace "
           "estimator falls back from xtrace to hutch++/hutchinson when its sketch does not")
    a("--quiet", action="store_true",
      help="no progress bars (by default each stage shows one on stderr when it is a terminal)")
    a("--slq-runs", type=int, default=5)
    a("--slq-steps", type=int, default=40)
    a("--slq-quadrature", choices=list(QUADRATURES), default="averaged",
      help="the density's quadrature per Lanczos run: averaged (Laurie's averaged Gauss rule, "
           "more accurate at few steps for the same HVPs) or gauss (Ritz values, as PyHessian)")


def _loss_targets(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                  loss: str, output: str | int | None = None) -> torch.Tensor:
    """``--loss mse`` on class labels regresses the one-hot vectors ``e_y`` (the squared loss
    of the linear-network analyses); float targets are used as they are."""
    if loss != "mse" or targets.is_floating_point():
        return targets
    with torch.no_grad():
        width = select_output(model(inputs[:1]), output).shape[-1]
    if int(targets.max()) >= width:
        raise ConfigError(f"--loss mse: labels go up to {int(targets.max())} but the model has "
                          f"{width} outputs", field="loss")
    return F.one_hot(targets.long(), width).to(inputs.dtype if inputs.is_floating_point()
                                               else torch.float32)


def prepare(args: argparse.Namespace) -> None:
    """``--shortcut/--init/--init-scale`` become model options of the ``--model`` built here;
    ``--max-memory`` and ``--batch-size`` are checked (the first becomes bytes) before any
    model is built. Under ``torchrun`` the process group is formed here (the runner has rank
    0 alone write the results: :func:`pnnh.probes.run_cli`)."""
    model_args = dict(getattr(args, "model_args", {}) or {})
    for flag, key in (("shortcut", "shortcut"), ("init", "init"), ("init_scale", "scale")):
        if getattr(args, flag, None) is not None:
            if not args.model:
                raise ConfigError(f"--{flag.replace('_', '-')}: applies to a --model built "
                                  "here, not to --checkpoint/--model-file", field=flag)
            model_args[key] = getattr(args, flag)
    args.model_args = model_args
    args.max_memory = parse_memory(getattr(args, "max_memory", None))
    size = getattr(args, "batch_size", None)
    if size is not None and size < 1:
        raise ConfigError(f"--batch-size: at least 1, got {size}", field="batch_size")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun: one shard of the batch per rank
        from pnnh.device import Distributed

        Distributed(getattr(args, "device", "cpu") or "cpu")


def _data(inputs: torch.Tensor, targets: torch.Tensor, batch_size: int | None = None):
    """The operator's data: under ``torchrun`` this rank's contiguous share of the samples
    (sizes differ by one at most; the operator all-reduces gradients and HVPs weighted by the
    shares' sizes), as one batch or, with ``batch_size``, a list of batches of that size."""
    world = _world_size()
    if world > 1:
        rank = torch.distributed.get_rank()
        inputs = torch.tensor_split(inputs, world)[rank]
        targets = torch.tensor_split(targets, world)[rank]
    if batch_size is None or batch_size >= inputs.shape[0]:
        return inputs, targets
    return list(zip(inputs.split(batch_size), targets.split(batch_size)))


def _in_float64(t: ProbeTarget) -> ProbeTarget:
    """``--float64``: the model's floating parameters and buffers and a floating batch in
    float64 (token ids stay integers)."""
    x = t.inputs.double() if t.inputs.is_floating_point() else t.inputs
    y = t.targets.double() if t.targets.is_floating_point() else t.targets
    return dataclasses.replace(t, model=t.model.double(), inputs=x, targets=y)


def _summarize_target(t: ProbeTarget, args: argparse.Namespace) -> tuple[dict, dict]:
    """One model's ``hessian.json`` record and its spectral density (for the plot)."""
    output = getattr(args, "output", None)
    if getattr(args, "float64", False):
        t = _in_float64(t)
    targets = _loss_targets(t.model, t.inputs, t.targets, args.loss, output)
    op = HessianOperator(t.model, _data(t.inputs, targets, getattr(args, "batch_size", None)),
                         args.loss, args.params,
                         hvp_mode=getattr(args, "hvp", "auto"),
                         fold_batchnorm=getattr(args, "fold_batchnorm", True),
                         max_memory=getattr(args, "max_memory", None),
                         progress=False if getattr(args, "quiet", False) else None,
                         output=output)
    summary, spec = hessian_summary(
        op, dense=args.dense, dense_limit=args.dense_limit, tol=args.tol,
        zero_tol=args.zero_tol, hutchinson_samples=args.hutchinson_samples,
        slq_runs=args.slq_runs, slq_steps=args.slq_steps, max_iter=args.max_iter,
        seed=args.seed, trace_method=getattr(args, "trace_method", "xtrace"),
        slq_quadrature=getattr(args, "slq_quadrature", "averaged"),
    )
    return {"model": t.label, **summary.to_dict()}, spec


def _block_records(t: ProbeTarget, args: argparse.Namespace) -> list[dict]:
    """``--blocks``: the curvature of each named diagonal block of one model's Hessian."""
    data = _data(t.inputs, t.targets, getattr(args, "batch_size", None))
    blocks = block_curvature(t.model, data, args.blocks, args.loss,
                             hvp_mode=getattr(args, "hvp", "auto"), tol=args.tol,
                             max_iter=args.max_iter, seed=args.seed,
                             trace_samples=args.hutchinson_samples,
                             trace_method=getattr(args, "trace_method", "xtrace"),
                             fold_batchnorm=getattr(args, "fold_batchnorm", True),
                             max_memory=getattr(args, "max_memory", None),
                             progress=False if getattr(args, "quiet", False) else None,
                             output=getattr(args, "output", None))
    return [{"model": t.label, **b} for b in blocks]


def run(targets: Sequence[ProbeTarget], args: argparse.Namespace, out: Path) -> ProbeResult:
    """One record per model (``hessian.json`` is a list whatever the number of models),
    ``hessian_spectrum.png`` and, with ``--blocks``, ``hessian_blocks.csv``/``.json``."""
    records, spectra, block_records, notes = [], {}, [], []
    if args.tol is None:  # above the rounding floor of float32 (float64) Lanczos vectors
        args.tol = 1e-6 if getattr(args, "float64", False) else 1e-5
    for t in targets:
        rec, spectra[t.label] = _summarize_target(t, args)
        if getattr(args, "blocks", None):
            block_records += _block_records(t, args)
        records.append(rec)
        cn = rec["condition_number"]
        if rec.get("precision_note"):
            notes.append(f"{t.label}: {rec['precision_note']}")
        notes.append(f"{t.label}: lambda_max={rec['lambda_max']:.6g} "
                     f"lambda_min={rec['lambda_min']:.6g} trace={rec['trace']:.6g} "
                     f"condition_number={'n/a' if cn is None else f'{cn:.6g}'} "
                     f"({rec['num_params']} params)")
    files = [plot_spectrum(spectra, out / "hessian_spectrum.png")]
    if block_records:
        files += write_records(block_records, out, "hessian_blocks")
        notes += [f"{b['model']} block {b['block']}: lambda_max={b['lambda_max']:.6g} "
                  f"lambda_min={b['lambda_min']:.6g} trace={b['trace']:.6g} "
                  f"({b['num_params']} params)" for b in block_records]
    notes.append(f"hessian: {out / 'hessian.json'}")
    return ProbeResult(records, None, notes, files)
