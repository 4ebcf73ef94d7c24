"""Singular values of the input-output Jacobian, per sample (dynamical isometry).

For one sample ``x`` and network ``f``, ``J(x) = ∂f(x)/∂x`` (``out × in``, the input
flattened). A network is *dynamically isometric* when all singular values of ``J`` are
close to 1; deep plain nets drift towards a spectrum dominated by a few large values
(or collapse towards 0), which is how gradients explode or vanish.

- :func:`input_jacobians` — exact ``J(x_i)`` for every sample, with ``torch.func``:
  ``vmap(jacrev(f))`` (``out`` VJPs per sample) when ``out <= in``, ``vmap(jacfwd(f))``
  otherwise; singular values by ``torch.linalg.svdvals``.
- :func:`top_singular_values` — the largest ``σ`` per sample by power iteration on ``JᵀJ``
  with one JVP and one VJP per step, never forming ``J`` (for large inputs *and* outputs).
- :func:`summarize` — per sample: mean squared singular value ``(1/r) Σ σ²`` (``= ||J||_F² / r``
  with ``r = min(out, in)``), ``σ_max``, ``σ_min``, the spread ``σ_max/σ_min`` and the standard
  deviation of ``log σ``; the probe reports their means over the batch.

The model must act on samples independently (``eval()`` mode for BatchNorm; ``pnnh probe
jacobian --bn batch`` holds the probe batch's statistics fixed). A model returning a
``ModelOutput``, dict or tuple is measured on ``output`` (``logits`` by default). Token ids
have no derivative: for integer inputs ``x`` is the input embedding's output (the vectors the
ids select), and ``J = ∂f/∂x`` is taken there, one sample at a time.
``pnnh probe jacobian`` writes ``jacobian.csv``/``jacobian.json`` (one row per model) and
``jacobian.png`` (the distribution of singular values).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from torch.func import jacfwd, jacrev, jvp, vjp, vmap

from pnnh.io import atomic_write_json, save_figure
from pnnh.probes.common import (
    ProbeResult,
    ProbeTarget,
    embedding_output,
    math_attention,
    select_output,
)

NAME = "jacobian"
DESCRIPTION = "singular values of the input-output Jacobian (dynamical isometry)"
BN_FIXED = True  # per-sample Jacobians: BatchNorm batch statistics are held fixed
MAX_SAVED_VALUES = 200_000  # jacobian_singular_values.json is left empty above this many


def embedded(model: nn.Module, ids: torch.Tensor, output: str | int | None = None):
    """For token ids: ``(e, f)`` with ``e`` the input embedding's output on ``ids`` and
    ``f(e')`` the model's (selected) output when the embedding returns ``e'`` instead."""
    with torch.no_grad(), embedding_output(model) as seen:
        model(ids)
    e = seen[0].detach()

    def f(value: torch.Tensor) -> torch.Tensor:
        with embedding_output(model, value):
            return select_output(model(ids), output)

    return e, f


def input_jacobians(model: nn.Module, inputs: torch.Tensor,
                    output: str | int | None = None) -> torch.Tensor:
    """Exact per-sample Jacobians of the flattened output w.r.t. the flattened input (for
    token ids: the flattened input embedding): shape ``(batch, out, in)``."""
    if not inputs.is_floating_point():
        rows = []
        for i in range(inputs.shape[0]):  # one sample at a time: Hugging Face forwards do not vmap
            e, f = embedded(model, inputs[i:i + 1], output)

            def g(e_flat: torch.Tensor, _f=f, _shape=e.shape) -> torch.Tensor:
                return _f(e_flat.view(_shape)).reshape(-1)

            with torch.no_grad():
                out_dim = g(e.reshape(-1)).numel()
            if out_dim <= e.numel():
                rows.append(jacrev(g)(e.reshape(-1)))
            else:
                with math_attention():  # forward-mode AD: the fused attention kernel has none
                    rows.append(jacfwd(g)(e.reshape(-1)))
        return torch.stack(rows)
    in_shape = inputs.shape[1:]

    def f(x_flat: torch.Tensor) -> torch.Tensor:
        return select_output(model(x_flat.view(1, *in_shape)), output).reshape(-1)

    flat = inputs.reshape(inputs.shape[0], -1)
    with torch.no_grad():
        out_dim = select_output(model(inputs[:1]), output).numel()
    if out_dim <= flat.shape[1]:
        return vmap(jacrev(f))(flat)
    with math_attention():  # forward-mode AD: the fused attention kernel has none
        return vmap(jacfwd(f))(flat)


def jacobian_singular_values(model: nn.Module, inputs: torch.Tensor,
                             output: str | int | None = None) -> torch.Tensor:
    """Singular values of every sample's exact Jacobian, descending: ``(batch, min(out, in))``."""
    return torch.linalg.svdvals(input_jacobians(model, inputs, output))


def top_singular_values(
    model: nn.Module, inputs: torch.Tensor, iters: int = 100, tol: float = 1e-6, seed: int = 0,
    output: str | int | None = None,
) -> torch.Tensor:
    """Largest singular value of each sample's Jacobian by power iteration on ``JᵀJ``.

    One step: ``u = J v`` (JVP), ``w = Jᵀ u`` (VJP), ``σ² ≈ ||w|| / ||v||`` with ``v`` unit;
    samples are independent, so the whole batch is one JVP and one VJP. Stops when every
    estimate changes by less than ``tol`` (relative). Token ids: at the input embedding.
    """
    if not inputs.is_floating_point():
        inputs, model = embedded(model, inputs, output)
    else:
        net = model
        model = lambda x: select_output(net(x), output)  # noqa: E731
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(inputs.shape, generator=gen, dtype=inputs.dtype).to(inputs.device)
    b = inputs.shape[0]

    def per_sample_norm(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(b, -1).norm(dim=1)

    v = v / per_sample_norm(v).view(b, *[1] * (v.dim() - 1))
    sigma = torch.zeros(b, dtype=inputs.dtype, device=inputs.device)
    for _ in range(iters):
        with math_attention():  # forward-mode AD: the fused attention kernel has none
            out, u = jvp(model, (inputs,), (v,))
        _, pullback = vjp(model, inputs)
        (w,) = pullback(u)
        nw = per_sample_norm(w)
        new = nw.sqrt()
        done = bool(((new - sigma).abs() <= tol * new.clamp_min(1e-30)).all())
        sigma = new
        v = w / nw.clamp_min(1e-30).view(b, *[1] * (w.dim() - 1))
        if done:
            break
    return sigma


def summarize(sv: torch.Tensor, zero_tol: float = 1e-12) -> dict:
    """Batch means of the per-sample statistics of singular values ``sv`` ``(batch, r)``."""
    sv = sv.detach().double()
    smax, smin = sv.max(1).values, sv.min(1).values
    pos = sv.clamp_min(zero_tol * smax.clamp_min(1e-300)[:, None])
    spread = smax / smin.clamp_min(1e-300)
    return {
        "num_samples": sv.shape[0],
        "num_singular_values": sv.shape[1],
        "mean_sq_singular_value": float((sv**2).mean()),
        "sv_max": float(smax.mean()),
        "sv_min": float(smin.mean()),
        "sv_max_overall": float(smax.max()),
        "sv_min_overall": float(smin.min()),
        "spread": float(spread.median()),  # σmax/σmin, median over samples (can be inf)
        "log_sv_std": float(pos.log().std(1).mean()) if sv.shape[1] > 1 else 0.0,
    }


def plot_singular_values(svs: dict[str, torch.Tensor], path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, sv in svs.items():
        s = sv.double().flatten().clamp_min(1e-12).log10().cpu().numpy()
        ax.hist(s, bins=60, density=True, histtype="step", label=label)
    ax.axvline(0.0, color="gray", lw=0.8, ls="--", label="isometry (σ = 1)")
    ax.set_xlabel("log10 singular value of the input-output Jacobian")
    ax.set_ylabel("density (all samples)")
    ax.set_title("Jacobian singular values")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)


def add_cli_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", choices=["exact", "power"], default="exact",
                   help="exact: full per-sample Jacobians + SVD; power: top σ by JVP/VJP only")
    p.add_argument("--power-iters", type=int, default=100)


def _measure(t: ProbeTarget, args: argparse.Namespace) -> tuple[dict, torch.Tensor]:
    """One model's record and its singular values ``(batch, r)`` (``r = 1`` for ``power``)."""
    if args.method == "exact":
        sv = jacobian_singular_values(t.model, t.inputs, getattr(args, "output", None))
        rec = {"model": t.label, "method": "exact (vmap(jacrev/jacfwd) + svdvals)", **summarize(sv)}
        return rec, sv.detach().cpu()
    top = top_singular_values(t.model, t.inputs, iters=args.power_iters,
                              output=getattr(args, "output", None))
    rec = {"model": t.label, "method": f"power iteration on JᵀJ ({args.power_iters} max)",
           "num_samples": int(top.numel()), "sv_max": float(top.mean()),
           "sv_max_overall": float(top.max())}
    return rec, top.detach().cpu()[:, None]


def run(targets: Sequence[ProbeTarget], args: argparse.Namespace, out: Path) -> ProbeResult:
    """One record per model, ``jacobian_singular_values.json`` (every value, when there are at
    most :data:`MAX_SAVED_VALUES`) and the histogram ``jacobian.png``."""
    records, svs, notes = [], {}, []
    for t in targets:
        rec, svs[t.label] = _measure(t, args)
        records.append(rec)
        msq = rec.get("mean_sq_singular_value")
        notes.append(f"{t.label}: sv_max={rec['sv_max']:.4g}"
                     + ("" if msq is None else f" sv_min={rec['sv_min']:.4g} mean_sq={msq:.4g}"
                        f" log_sv_std={rec['log_sv_std']:.3g}"))
    small = sum(v.numel() for v in svs.values()) <= MAX_SAVED_VALUES
    values = atomic_write_json(out / "jacobian_singular_values.json",
                               {k: v.tolist() for k, v in svs.items()} if small else {})
    figure = plot_singular_values(svs, out / "jacobian.png")
    notes.append(f"jacobian: {out / 'jacobian.csv'}")
    return ProbeResult(records, None, notes, [values, figure])
