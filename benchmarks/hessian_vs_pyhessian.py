"""Curvature at equal error: pnnh vs PyHessian for λmax, λmin, the trace and the density.

Each tool runs at several settings of its own knobs; each run's *achieved error* is measured
against a tight reference, and the time ratio is taken at equal error: for every PyHessian
setting, the fastest pnnh setting whose error is no larger (``ratio = PyHessian time / pnnh
time``, above 1 = pnnh faster). Timing is interleaved (every contender once per round, the
order rotated) and the best of ``--repeats`` rounds is kept.

Problems (nothing is downloaded; inputs are seeded Gaussians with random labels, eval mode,
cross-entropy, float32, same data and model for both tools):

- ``resnet20`` (registry, 272,474 params), batch ``--batch``: λmax and λmin. Reference: pnnh
  Lanczos at ``tol 1e-9`` (both ends, guaranteed residual bound) on a float64 copy of the
  model and batch, BatchNorm not folded (errors below ~1e-6 are float32 rounding of the
  operator itself, for both tools).
- ``smallconv`` (two 3x3 convolutions and a linear head, 938 params), batch 64: the trace and
  the spectral density. Reference: the exact dense Hessian (its trace; its eigenvalues).

Contenders:

- λmax — PyHessian ``hessian.eigenvalues(tol)`` (power iteration, stopped when two estimates
  differ by < tol relative); pnnh ``extreme_eigenvalues(which="max", bound="gap", tol)``
  (Lanczos from the gradient, stopped when the Kato–Temple estimate ``r²/gap <= tol·|θ|``).
- λmin — PyHessian has no λmin; the PyHessian recipe is its power iteration for λmax, then
  power iteration on ``H − λmax I`` with its own primitives and stopping rule (``maxIter``
  100, its default; also run to ``--pyh-min-iters`` steps with the early stop disabled, since
  from a random start the rule stops at once in the bulk of the spectrum); pnnh
  ``extreme_eigenvalues(which="both", bound="gap", tol)``: one Lanczos run for both ends.
- trace — PyHessian ``hessian.trace(maxIter, tol)`` (Hutchinson, stopped when the running mean
  moves by < tol relative; also run to a fixed ``maxIter`` with the early stop disabled);
  pnnh ``trace(method, num_samples=budget)`` for XTrace, Hutch++ and (batched) Hutchinson.
  Errors are
  root-mean-square over ``--seeds`` seeds; the time is that of all the seeds' runs together,
  estimation only (the errors are scored after the clock stops).
- density — PyHessian ``hessian.density(iter, n_v=1)`` (SLQ; its final ``torch.eig``, gone from
  torch 2.x, is replaced by ``torch.linalg.eigh`` of the same tridiagonal matrix); pnnh
  ``spectral_density(num_runs=1, num_steps)`` with its default averaged Gauss quadrature (the
  same HVPs; :func:`pnnh.probes.hessian.slq_quadrature`) and, for the record, with the Gauss
  rule PyHessian uses (``gauss steps N``). Error: L1 distance between the Gaussian-smoothed
  estimate and the smoothed exact spectrum (σ = 2% of the spectral span, same grid); both tools
  draw the same Rademacher start vectors, so at enough steps both reach the same floor, that
  one random vector's own error.

HVPs: PyHessian's double backward over a graph built once; pnnh ``hvp_mode="auto"`` (resolves
to the same double backward for single HVPs; Hutchinson's ``vᵀHv`` by vmapped
forward-over-forward AD and, on the small net, the sketch blocks by vmapped
forward-over-reverse: see ``HessianOperator.quadratic_forms`` and ``hvp_many``). On
ResNet-20 pnnh folds each eval-mode BatchNorm into the convolution before it inside the loss
(:mod:`pnnh.probes.bnfold`: the same Hessian, a cheaper double backward); PyHessian runs the
model as it is.
Writes ``benchmarks/results/hessian_vs_pyhessian.json`` and
``docs/figures/hessian_time_vs_error.png``. Run:
``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/hessian_vs_pyhessian.py --threads 1``.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pnnh.models import count_parameters, create_model
from pnnh.probes.hessian import HessianOperator, slq_density

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import machine_info, save_results, synchronizer  # noqa: E402

QUANTITIES = ("trace", "density", "lambda_max", "lambda_min")
FIGURE = Path(__file__).resolve().parents[1] / "docs" / "figures" / "hessian_time_vs_error.png"


# -- problems ---------------------------------------------------------------------------------
def small_conv(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.Tanh(), nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, padding=1), nn.Tanh(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        nn.Linear(32, 10),
    ).eval()


def make_problem(name: str, device: str, batch: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    if name == "resnet20":
        torch.manual_seed(seed)
        model = create_model("resnet20", in_shape=(3, 32, 32), num_classes=10).eval()
        x = torch.randn(batch, 3, 32, 32, generator=g)
    else:
        model, x = small_conv(seed), torch.randn(batch, 3, 8, 8, generator=g)
    y = torch.randint(0, 10, (x.shape[0],), generator=g)
    return model.to(device), x.to(device), y.to(device)


# -- PyHessian, used as published --------------------------------------------------------------
def pyhessian_module():
    from pyhessian import hessian  # noqa: F401  (the bench extra)

    return sys.modules["pyhessian.hessian"]


def _pyh(model, x, y, device):
    ph = pyhessian_module()
    return ph.hessian(model, F.cross_entropy, data=(x, y), cuda=device.startswith("cuda"))


def _clear(model) -> None:
    for p in model.parameters():
        p.grad = None


def pyh_lambda_max(model, x, y, device, tol: float, seed: int) -> dict:
    torch.manual_seed(seed)
    h = _pyh(model, x, y, device)
    eig, _ = h.eigenvalues(maxIter=100, tol=tol, top_n=1)
    _clear(model)
    return {"value": float(eig[0])}


def pyh_lambda_min(model, x, y, device, tol: float, seed: int, max_iter: int = 100,
                   max_tol: float | None = None) -> dict:
    """PyHessian's power iteration for λmax (at ``max_tol``, default ``tol``), then the same
    iteration on ``H − λmax I`` (at ``tol``, at most ``max_iter`` steps)."""
    ph = pyhessian_module()
    torch.manual_seed(seed)
    h = _pyh(model, x, y, device)
    (lmax,), _ = h.eigenvalues(maxIter=100, tol=tol if max_tol is None else max_tol, top_n=1)
    v = ph.normalization([torch.randn(p.size(), device=p.device) for p in h.params])
    est = None
    for _ in range(max_iter):
        hv = ph.hessian_vector_product(h.gradsH, h.params, v)
        shifted = [a - lmax * b for a, b in zip(hv, v)]
        val = ph.group_product(shifted, v).cpu().item()
        v = ph.normalization(shifted)
        if est is not None and abs(est - val) / (abs(est) + 1e-6) < tol:
            est = val
            break
        est = val
    _clear(model)
    return {"value": float(est + lmax)}


def pyh_trace(model, x, y, device, tol: float, seed: int, max_iter: int = 100) -> dict:
    torch.manual_seed(seed)
    vals = _pyh(model, x, y, device).trace(maxIter=max_iter, tol=tol)
    _clear(model)
    return {"value": float(sum(vals) / len(vals)), "hvps": len(vals)}


def pyh_density(model, x, y, device, steps: int, seed: int) -> dict:
    torch.manual_seed(seed)
    h = _pyh(model, x, y, device)

    def eig(t, eigenvectors=True):  # torch.eig's old return: (eigenvalues as (re, im), V)
        w, vecs = torch.linalg.eigh(t)
        return torch.stack([w, torch.zeros_like(w)], 1), vecs

    had = hasattr(torch, "eig")
    old = getattr(torch, "eig", None)
    torch.eig = eig
    try:
        nodes, weights = h.density(iter=steps, n_v=1)
    finally:
        if had:
            torch.eig = old
        else:
            del torch.eig
    _clear(model)
    return {"nodes": [torch.tensor(nodes[0], dtype=torch.float64)],
            "weights": [torch.tensor(weights[0], dtype=torch.float64)]}


# -- pnnh ---------------------------------------------------------------------------------------
def ours_extreme(model, x, y, tol: float, seed: int, which: str) -> dict:
    op = HessianOperator(model, (x, y), "ce")
    r = op.extreme_eigenvalues(tol=tol, max_iter=100, seed=seed, which=which, bound="gap")
    return {"value": r["lambda_max"] if which == "max" else r["lambda_min"], "hvps": r["hvps"],
            "hvp": r["hvp"]}


def ours_trace(model, x, y, budget: int, seed: int, method: str = "xtrace") -> dict:
    r = HessianOperator(model, (x, y), "ce").trace(budget, seed=seed, method=method)
    return {"value": r["trace"], "hvps": r["hvps"]}


def ours_density(model, x, y, steps: int, seed: int, quadrature: str = "averaged") -> dict:
    return HessianOperator(model, (x, y), "ce").spectral_density(1, steps, seed=seed,
                                                                 quadrature=quadrature)


# -- timing and scoring -------------------------------------------------------------------------
def density_error(spec: dict, exact: torch.Tensor, sigma: float, grid: torch.Tensor) -> float:
    """``∫ |p_est − p_exact| dλ`` of the Gaussian-smoothed densities (0 = equal, 2 = disjoint),
    on the CPU whichever device the tools ran on."""
    exact = exact.cpu()
    ones = [torch.full_like(exact, 1.0 / exact.numel())]
    ref = slq_density([exact], ones, grid, sigma)
    est = slq_density([n.cpu() for n in spec["nodes"]], [w.cpu() for w in spec["weights"]],
                      grid, sigma)
    return float((est - ref).abs().sum() * (grid[1] - grid[0]))


def timed_rounds(contenders: dict[str, Callable[[], dict]], repeats: int, device: str) -> dict:
    """Every contender once per round, order rotated; keeps every time and the last output."""
    names, sync = list(contenders), synchronizer(device)
    times: dict[str, list[float]] = {n: [] for n in names}
    outs: dict[str, dict] = {}
    for r in range(repeats):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            sync()
            t = time.perf_counter()
            outs[n] = contenders[n]()
            sync()
            times[n].append(time.perf_counter() - t)
    return {n: {"seconds": times[n], "best": min(times[n]), "out": outs[n]} for n in names}


def equal_error_ratios(rows: list[dict], slack: float = 0.01) -> list[dict]:
    """For each PyHessian setting, the fastest pnnh setting with error <= its error (to within
    ``slack`` relative: equal-looking plateaus count as equal)."""
    ours = [r for r in rows if r["tool"] == "pnnh"]
    out = []
    for p in (r for r in rows if r["tool"] == "pyhessian"):
        ok = [o for o in ours if o["error"] <= p["error"] * (1 + slack)]
        best = min(ok, key=lambda o: o["best"]) if ok else None
        out.append({"pyhessian": p["setting"], "pyhessian_error": p["error"],
                    "pyhessian_seconds": p["best"],
                    "pnnh": best["setting"] if best else None,
                    "pnnh_error": best["error"] if best else None,
                    "pnnh_seconds": best["best"] if best else None,
                    "ratio": p["best"] / best["best"] if best else None})
    return out


def run_quantity(name: str, contenders: dict, score: Callable[[dict], float], repeats: int,
                 device: str) -> dict:
    timed = timed_rounds(contenders, repeats, device)
    rows = []
    for key, t in timed.items():
        tool, setting = key.split(" ", 1)
        rows.append({"tool": tool, "setting": setting, "best": t["best"], "seconds": t["seconds"],
                     "error": score(t["out"]), "hvps": t["out"].get("hvps")})
    ratios = equal_error_ratios(rows)
    print(f"\n{name}: best of {repeats}, interleaved")
    print(f"  {'tool':<10} {'setting':<22} {'rel. error':>11} {'HVPs':>6} {'seconds':>9}")
    for r in rows:
        hv = "" if r["hvps"] is None else r["hvps"]
        print(f"  {r['tool']:<10} {r['setting']:<22} {r['error']:>11.2e} {hv!s:>6} "
              f"{r['best']:>9.3f}")
    for q in ratios:
        if q["ratio"] is None:
            print(f"  at PyHessian {q['pyhessian']} (error {q['pyhessian_error']:.2e}): no pnnh "
                  "setting reached it")
        else:
            print(f"  at PyHessian {q['pyhessian']} (error {q['pyhessian_error']:.2e}): pnnh "
                  f"{q['pnnh']} (error {q['pnnh_error']:.2e}) -> ratio {q['ratio']:.2f}x")
    return {"rows": rows, "equal_error": ratios}


def averaged(fn: Callable[[int], dict], seeds: int) -> Callable[[], dict]:
    """Run ``fn`` for seeds 0..n-1 (the timed work: estimation only, no scoring)."""
    def run() -> dict:
        outs = [fn(s) for s in range(seeds)]
        hv = [o.get("hvps") for o in outs]
        return {"outs": outs, "hvps": (sum(hv) / len(hv)) if None not in hv else None}
    return run


def rms_error(score: Callable[[dict], float]) -> Callable[[dict], float]:
    """The RMS over seeds of ``score``, applied after timing to an :func:`averaged` output."""
    def rms(o: dict) -> float:
        errs = [score(x) for x in o["outs"]]
        return math.sqrt(sum(e * e for e in errs) / len(errs))
    return rms


# -- the four quantities --------------------------------------------------------------------------
def bench_extremes(args) -> dict:
    model, x, y = make_problem("resnet20", args.device, args.batch, args.seed)
    F.cross_entropy(model(x), y).backward()  # warm-up
    _clear(model)
    # the reference in float64, on the model as it is (no BatchNorm folding): both tools'
    # float32 operators carry rounding of ~1e-6 relative, which a float32 reference would share
    op = HessianOperator(copy.deepcopy(model).double(), (x.double(), y), "ce",
                         fold_batchnorm=False)
    ref = op.extreme_eigenvalues(tol=args.ref_tol, max_iter=args.ref_iter, seed=1)
    print(f"reference (float64): λmax {ref['lambda_max']:.9g} λmin {ref['lambda_min']:.9g} "
          f"({ref['iterations']} Lanczos steps, converged={ref['converged']}, "
          f"residuals {ref['residual_max']:.1e} / {ref['residual_min']:.1e})")
    out = {"params": count_parameters(model), "reference": {
        k: ref[k] for k in ("lambda_max", "lambda_min", "residual_max", "residual_min",
                            "iterations", "converged", "hvp")}}
    d = args.device
    for which, key, pyfn in (("max", "lambda_max", pyh_lambda_max),
                             ("both", "lambda_min", pyh_lambda_min)):
        if key not in args.quantities:
            continue
        lam = ref[key]
        cont = {}
        for tol in (args.pyh_tols if which == "max" else args.pyh_min_tols):
            cont[f"pyhessian tol {tol:g}"] = (
                lambda tol=tol, pyfn=pyfn: pyfn(model, x, y, d, tol, args.seed + 10))
        for tol in args.our_tols:
            cont[f"pnnh tol {tol:g}"] = (
                lambda tol=tol, which=which: ours_extreme(model, x, y, tol, args.seed + 10, which))
        if which == "both":  # the same iteration run to maxIter (its rule stops at once)
            for n in args.pyh_min_iters:
                cont[f"pyhessian {n} iterations"] = (  # λmax first at its tol 1e-3
                    lambda n=n: pyh_lambda_min(model, x, y, d, float("-inf"), args.seed + 10, n,
                                               max_tol=1e-3))
        out[key] = run_quantity(f"ResNet-20 {key} (reference {lam:.6g})", cont,
                                lambda o, lam=lam: abs(o["value"] - lam) / abs(lam),
                                args.repeats, d)
    return out


def bench_trace_density(args) -> dict:
    model, x, y = make_problem("smallconv", args.device, 64, args.seed)
    op = HessianOperator(model, (x, y), "ce")
    h = op.dense()
    exact = torch.linalg.eigvalsh(h.double())
    tr = float(exact.sum())
    span = float(exact[-1] - exact[0])
    sigma = 0.02 * span
    grid = torch.linspace(float(exact[0]) - 4 * sigma, float(exact[-1]) + 4 * sigma, 2000,
                          dtype=torch.float64)
    print(f"\nsmall conv net: {op.dim} params, exact trace {tr:.6g}, "
          f"λ in [{float(exact[0]):.4g}, {float(exact[-1]):.4g}]")
    d, seeds = args.device, args.seeds

    def tr_err(o):
        return abs(o["value"] - tr) / abs(tr)

    out = {"params": op.dim, "exact_trace": tr, "sigma": sigma}
    cont = {}
    for tol in (args.trace_tols if "trace" in args.quantities else []):
        cont[f"pyhessian tol {tol:g}"] = averaged(
            lambda s, tol=tol: pyh_trace(model, x, y, d, tol, s), seeds)
    for n in args.pyh_trace_samples:  # its Hutchinson without the early stop (tol = -inf)
        cont[f"pyhessian {n} samples"] = averaged(
            lambda s, n=n: pyh_trace(model, x, y, d, float("-inf"), s, n), seeds)
    for method, budgets in (("xtrace", args.trace_budgets), ("hutch++", args.hutchpp_budgets),
                            ("hutchinson", args.hutchinson_budgets)):
        for b in (budgets if "trace" in args.quantities else []):
            cont[f"pnnh {method} {b}"] = averaged(
                lambda s, b=b, m=method: ours_trace(model, x, y, b, s, m), seeds)
    if cont:
        out["trace"] = run_quantity(f"trace (exact {tr:.6g}), RMS over {seeds} seeds", cont,
                                    rms_error(tr_err), args.repeats, d)

    def den_err(o):
        return density_error(o, exact, sigma, grid)

    if "density" not in args.quantities:
        return out
    cont = {}
    for steps in args.pyh_slq_steps:
        cont[f"pyhessian iter {steps}"] = averaged(
            lambda s, steps=steps: pyh_density(model, x, y, d, steps, s), seeds)
    for steps in args.slq_steps:
        cont[f"pnnh steps {steps}"] = averaged(
            lambda s, steps=steps: ours_density(model, x, y, steps, s), seeds)
    for steps in args.slq_gauss_steps:  # the Gauss rule (PyHessian's), for the record
        cont[f"pnnh gauss steps {steps}"] = averaged(
            lambda s, steps=steps: ours_density(model, x, y, steps, s, "gauss"), seeds)
    out["density"] = run_quantity("density (L1 to the smoothed exact spectrum; error column = "
                                  "L1)", cont, rms_error(den_err), args.repeats, d)
    return out


def plot(results: dict, path: Path) -> Path:
    """Time vs achieved error per quantity: every setting a point, each tool's Pareto front
    (the lowest error reached within a given time) a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    from pnnh.io import save_figure

    panels = [("ResNet-20 λmax", results["extremes"]["lambda_max"]),
              ("ResNet-20 λmin", results["extremes"]["lambda_min"]),
              ("small conv net trace", results["small"]["trace"]),
              ("small conv net density (L1)", results["small"]["density"])]
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.8))
    for ax, (title, q) in zip(axes, panels):
        for tool, marker, style, label in (("pyhessian", "s", "--", "PyHessian"),
                                           ("pnnh", "o", "-", "pnnh")):
            rs = sorted((r for r in q["rows"] if r["tool"] == tool), key=lambda r: r["best"])
            ts, es = [r["best"] for r in rs], [max(r["error"], 1e-16) for r in rs]
            front_t, front_e, best = [], [], math.inf
            for t, e in zip(ts, es):
                if e < best:
                    best = e
                    front_t.append(t)
                    front_e.append(e)
            line = ax.step(front_t, front_e, style, where="post", label=label)[0]
            ax.plot(ts, es, marker, color=line.get_color(), linestyle="none")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("seconds (best of rounds)")
        ax.set_title(title, fontsize=10)
    axes[0].set_ylabel("achieved error")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=32, help="ResNet-20 batch")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seeds", type=int, default=5, help="seeds per trace/density setting")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ref-tol", type=float, default=1e-9)
    ap.add_argument("--ref-iter", type=int, default=120)
    ap.add_argument("--pyh-tols", type=float, nargs="+", default=[1e-2, 1e-3, 1e-4, 1e-6])
    ap.add_argument("--pyh-min-tols", type=float, nargs="+", default=[1e-3])
    ap.add_argument("--pyh-min-iters", type=int, nargs="+", default=[100],
                    help="λmin: PyHessian's shifted power iteration run to this many steps")
    ap.add_argument("--our-tols", type=float, nargs="+", default=[1e-1, 1e-2, 1e-3, 1e-4, 1e-6])
    ap.add_argument("--trace-tols", type=float, nargs="+", default=[1e-2, 1e-3, 1e-4])
    ap.add_argument("--pyh-trace-samples", type=int, nargs="+", default=[100, 400],
                    help="PyHessian Hutchinson run to a fixed number of samples")
    ap.add_argument("--trace-budgets", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    ap.add_argument("--hutchpp-budgets", type=int, nargs="+", default=[32, 128, 256])
    ap.add_argument("--hutchinson-budgets", type=int, nargs="+",
                    default=[4, 8, 16, 32, 100, 200, 400])
    ap.add_argument("--pyh-slq-steps", type=int, nargs="+", default=[100, 30, 20])
    ap.add_argument("--slq-steps", type=int, nargs="+",
                    default=[10, 12, 14, 16, 18, 20, 22, 25, 30],
                    help="pnnh SLQ steps, averaged Gauss quadrature (its default)")
    ap.add_argument("--slq-gauss-steps", type=int, nargs="+", default=[15, 20, 25],
                    help="pnnh SLQ steps with the Gauss rule")
    ap.add_argument("--skip-resnet", action="store_true", help="trace and density only")
    ap.add_argument("--quantities", nargs="+", choices=QUANTITIES, default=list(QUANTITIES),
                    help="a subset: results go to hessian_vs_pyhessian_<subset>.json, no figure")
    ap.add_argument("--figure", type=Path, default=FIGURE)
    ap.add_argument("--out", type=Path, default=None, help="results directory")
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny settings")
    ap.add_argument("--replot", type=Path, nargs="+", default=None,
                    help="only redraw --figure from results JSONs of this script (a later "
                    "file's quantities replace an earlier one's)")
    args = ap.parse_args(argv)
    if args.replot:
        import json

        merged: dict = {"small": {}, "extremes": {}}
        for path in args.replot:
            data = json.loads(path.read_text())
            for part in merged:
                merged[part].update(data.get(part, {}))
        print(f"figure: {plot(merged, args.figure)}")
        return {}
    if args.quick:
        args.batch, args.repeats, args.seeds, args.ref_iter, args.ref_tol = 2, 1, 1, 12, 1e-3
        args.pyh_tols, args.pyh_min_tols, args.our_tols = [1e-2], [1e-1], [1e-2]
        args.pyh_min_iters = [3]
        args.trace_tols, args.trace_budgets, args.pyh_trace_samples = [1e-2], [16], [8]
        args.hutchpp_budgets, args.hutchinson_budgets = [12], [8]
        args.pyh_slq_steps, args.slq_steps, args.slq_gauss_steps = [10], [10], [10]
    torch.set_num_threads(args.threads)
    info = machine_info(args.device)
    info["loadavg_before"] = info["loadavg_1_5_15"]
    results = {}
    if {"trace", "density"} & set(args.quantities):
        results["small"] = bench_trace_density(args)
    if {"lambda_max", "lambda_min"} & set(args.quantities) and not args.skip_resnet:
        results["extremes"] = bench_extremes(args)
    info["loadavg_1_5_15"] = machine_info()["loadavg_1_5_15"]
    print(f"\nload average before {info['loadavg_before']}, after {info['loadavg_1_5_15']}")
    everything = len(set(QUANTITIES) - set(args.quantities)) == 0 and not args.skip_resnet
    if everything and args.figure:
        fig = args.figure if not args.quick else Path(args.out or ".") / "hessian_quick.png"
        print(f"figure: {plot(results, fig)}")
    name = "hessian_vs_pyhessian" + ("" if everything else "_" + "_".join(args.quantities))
    return save_results(name, args, info, **results)


if __name__ == "__main__":
    main()
