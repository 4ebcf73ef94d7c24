"""How far any exact-HVP method can get ahead of PyHessian on real models: the ceilings under
the ratios of ``hessian_real.py``.

**λmax.** A call costs a setup ``S`` (one forward and one backward with ``create_graph``: the
gradient graph) and ``n`` HVPs of ``h`` seconds each (one double backward over that graph).
Both are measured bare (``torch.autograd`` on the model's own parameter tensors, nothing around
it: no estimator, no flat vectors) in a fresh process per model, cold (first in the process)
and warm. With PyHessian's HVP count ``n_P`` and pnnh's ``n`` at equal error (from
``hessian_real.json``), ``(S + n_P h) / (S + n h)`` is the ratio any two implementations of the
two methods reach with no overhead on either side, and ``T_P / (S + n h)`` the ratio against
PyHessian's measured seconds ``T_P`` of a pnnh with none. A stopping rule can also cost HVPs:
the run also records Lanczos's own error after each HVP (from the gradient, against the
reference λmax), and ``(S + n_P h) / (S + k h)`` with ``k`` the first HVP within PyHessian's
error is the ceiling with an ideal stopping rule as well.

**Trace.** The estimators of PyHessian, curvlinops and pnnh are all Hutchinson's, alone or
beside an exactly computed low-rank part (Hutch++, XTrace)::

    tr H = tr(Qᵀ H Q) + E[vᵀ P H P v],    P = I − Q Qᵀ,  v Rademacher

Deflating ``Q`` cuts the variance per sample from ``Var[vᵀHv]`` to ``Var[vᵀPHPv]`` (ratio
``ρ``) for the ``k`` HVPs that found ``Q``. Here ``Q`` is the ``k``-step Lanczos basis, the
Krylov space of the top of the spectrum (what a sketch of ``k`` columns at best captures);
``ρ`` is measured on the same Rademacher vectors. At ``m`` HVPs of plain Hutchinson, the
deflated estimator reaches the same variance with ``k + m ρ``: a speed-up of at most
``m / (k + m ρ) < 1/ρ``. PyHessian's trace is plain Hutchinson at about the same cost per HVP
(``hessian_real.py``'s profile), so ``1/ρ`` bounds any such estimator's advantage over it.

Writes ``benchmarks/results/hessian_ceiling.json``. Run (about 10 minutes on the development
CPU; ``hessian_real.py`` first, for the HVP counts)::

    OMP_NUM_THREADS=1 .venv-ecosystem/bin/python benchmarks/hessian_ceiling.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _util import RESULTS, machine_info, save_results  # noqa: E402
from hessian_real import MODELS, problem, run_worker, use_allocator  # noqa: E402


def bare_worker(spec: dict) -> dict:
    """In a fresh process: the bare gradient graph and HVP of one model, cold then warm
    (``spec["allocator"] == "cli"``: glibc set as the ``pnnh`` command sets it first)."""
    use_allocator(spec)
    torch.set_num_threads(spec["threads"])
    model, x, y = problem(spec["model"], spec["batch"])
    params = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(0)
    vs = [torch.randn(p.shape, generator=gen) for p in params]
    out = {}
    for when in ("cold", "warm"):
        t = time.perf_counter()
        g = torch.autograd.grad(F.cross_entropy(model(x), y), params, create_graph=True)
        setup = time.perf_counter() - t
        hvps = []
        for _ in range(spec["hvps"]):
            t = time.perf_counter()
            torch.autograd.grad(g, params, grad_outputs=vs, retain_graph=True)
            hvps.append(time.perf_counter() - t)
        del g
        out[when] = {"setup": setup, "hvp": statistics.median(hvps), "per_hvp": hvps}
    return out


def lanczos_errors(name: str, reference: float, steps: int, batch: int) -> list[float]:
    """Relative error of Lanczos's λmax (from the gradient, as pnnh's ``which="max"``) after
    each of ``steps`` HVPs, whatever a stopping rule would have said."""
    from pnnh.probes.hessian import HessianOperator, lanczos

    model, x, y = problem(name, batch)
    op = HessianOperator(model, (x, y), "ce", progress=False)
    errors: list[float] = []
    lanczos(op.hvp, op.dim, steps, tol=0.0, v0=op.start_vector("gradient", 0), stop="max",
            dtype=op.vector_dtype, out_arg=True,
            on_step=lambda t, s, b: errors.append(abs(float(t[-1]) - reference) / reference))
    return errors


def lambda_max_ceiling(name: str, real: dict, args) -> dict:
    """Bare S and h of ``name`` (best of ``--repeats`` fresh processes) against the HVP counts
    and seconds of ``hessian_real.json``'s equal-error rows, and against the fewest HVPs after
    which Lanczos's λmax is as close as PyHessian's (an ideal stopping rule)."""
    spec = {"model": name, "batch": args.batch, "threads": args.threads, "hvps": args.hvps}
    pyh = [r for r in real["rows"] if r["tool"] == "pyhessian"]
    errors = lanczos_errors(name, real["reference"]["lambda_max"],
                            max(r["cold"]["hvps"] for r in pyh), args.batch)
    print(f"\n{name}: Lanczos λmax error after each HVP: "
          + ", ".join(f"{e:.1e}" for e in errors))
    runs = [run_worker(spec, script=__file__) for _ in range(args.repeats)]
    bare = {when: min((r[when] for r in runs), key=lambda b: b["setup"] + b["hvp"])
            for when in ("cold", "warm")}
    rows = {(r["tool"], r["setting"]): r for r in real["rows"]}
    print(f"{name}: bare setup S {bare['cold']['setup']:.2f} s cold / "
          f"{bare['warm']['setup']:.2f} s warm, HVP h {bare['cold']['hvp']:.2f} / "
          f"{bare['warm']['hvp']:.2f} s")
    out = []
    for when in ("cold", "warm"):
        s, h = bare[when]["setup"], bare[when]["hvp"]
        for q in real["equal_error"][f"pyhessian {when}"]:
            if not q["pnnh"]:
                continue
            n_p = rows[("pyhessian", q["setting"])][when]["hvps"]
            n = rows[("pnnh", q["pnnh"])][when]["hvps"]
            k = next((i + 1 for i, e in enumerate(errors) if e <= q["error"]), None)
            row = {"when": when, "pyhessian": q["setting"], "pyhessian_hvps": n_p,
                   "pyhessian_seconds": q["seconds"], "pnnh": q["pnnh"], "pnnh_hvps": n,
                   "pnnh_seconds": q["pnnh_seconds"], "measured_ratio": q["ratio"],
                   "bare_both": (s + n_p * h) / (s + n * h),
                   "bare_pnnh": q["seconds"] / (s + n * h), "lanczos_hvps": k,
                   "ideal_both": k and (s + n_p * h) / (s + k * h)}
            out.append(row)
            ideal = f"{row['ideal_both']:.2f}x at {k} HVPs" if k else "not within the HVPs run"
            print(f"  {when}: PyHessian {q['setting']} ({n_p} HVPs, {q['seconds']:.2f} s) vs pnnh "
                  f"{q['pnnh']} ({n} HVPs, {q['pnnh_seconds']:.2f} s): measured "
                  f"{q['ratio']:.2f}x; no overhead on either side {row['bare_both']:.2f}x; "
                  f"against PyHessian as measured {row['bare_pnnh']:.2f}x; with an ideal "
                  f"stopping rule and no overhead {ideal}")
    return {"bare": bare, "lanczos_errors": errors, "rows": out}


def trace_ceiling(name: str, args) -> dict:
    """``ρ = Var[vᵀPHPv] / Var[vᵀHv]`` with ``Q`` the ``--krylov``-step Lanczos basis."""
    from pnnh.probes.hessian import HessianOperator

    model, x, y = problem(name, args.batch)
    op = HessianOperator(model, (x, y), "ce", progress=False)
    gen = torch.Generator().manual_seed(args.seed)
    k, t0 = args.krylov, time.perf_counter()
    q = torch.randn(op.dim, generator=gen)
    basis = torch.empty(k, op.dim)
    basis[0] = q / q.norm()
    alphas = []
    for j in range(k):  # Lanczos with full Gram-Schmidt, twice (the basis must be orthonormal)
        w = op.hvp(basis[j])
        alphas.append(float(basis[j].double() @ w.double()))
        if j + 1 == k:
            break
        for _ in range(2):
            w -= basis[: j + 1].T @ (basis[: j + 1] @ w)
        basis[j + 1] = w / w.norm()
    exact_part = sum(alphas)  # tr(QᵀHQ): the diagonal of T
    plain, deflated = [], []
    for _ in range(args.samples):
        v = torch.randint(0, 2, (op.dim,), generator=gen).float().mul_(2).sub_(1)
        plain.append(float(v.double() @ op.hvp(v).double()))
        u = v - basis.T @ (basis @ v)
        deflated.append(float(u.double() @ op.hvp(u).double()))
    var_p, var_d = statistics.variance(plain), statistics.variance(deflated)
    rho = var_d / var_p
    m = args.samples
    out = {"krylov": k, "samples": m, "seconds": time.perf_counter() - t0,
           "trace_plain": statistics.mean(plain),
           "trace_deflated": exact_part + statistics.mean(deflated), "exact_part": exact_part,
           "sd_plain": var_p ** 0.5, "sd_deflated": var_d ** 0.5, "rho": rho,
           "max_speedup": 1 / rho,
           "speedup_at": {str(n): n / (k + n * rho) for n in args.budgets}}
    print(f"\n{name} trace: Hutchinson {out['trace_plain']:.5g} (sd per sample "
          f"{out['sd_plain']:.3g}), deflated by a {k}-vector Krylov basis "
          f"{out['trace_deflated']:.5g} (sd {out['sd_deflated']:.3g}; the basis holds "
          f"{exact_part:.5g}); variance ratio ρ = {rho:.3f} over {m} samples")
    print("  best speed-up over Hutchinson at equal error: " + ", ".join(
        f"{v:.2f}x at {n} HVPs" for n, v in out["speedup_at"].items())
        + f", {1 / rho:.2f}x with unlimited HVPs")
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--models", nargs="*", choices=MODELS, default=list(MODELS))
    ap.add_argument("--trace-models", nargs="*", choices=MODELS,
                    default=["resnet18", "efficientnet_b0"])
    ap.add_argument("--real", type=Path, default=RESULTS / "hessian_real.json",
                    help="hessian_real.py's results (the HVP counts at equal error)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2, help="fresh processes per model")
    ap.add_argument("--hvps", type=int, default=5, help="bare HVPs timed per call")
    ap.add_argument("--krylov", type=int, default=30, help="trace: deflated basis size k")
    ap.add_argument("--samples", type=int, default=24, help="trace: Rademacher samples")
    ap.add_argument("--budgets", type=int, nargs="+", default=[25, 100, 400])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="results directory")
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny model and settings")
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(bare_worker(json.loads(args.worker))))
        return {}
    if args.quick:
        args.models, args.trace_models, args.repeats, args.hvps = ["tiny_cnn"], ["tiny_cnn"], 1, 2
        args.krylov, args.samples, args.budgets, args.batch = 4, 6, [10], 2
    torch.set_num_threads(args.threads)
    info = machine_info()
    real = json.loads(args.real.read_text())["lambda_max"] if args.models else {}
    missing = [m for m in args.models if m not in real]
    if missing:
        raise SystemExit(f"--real {args.real}: no λmax rows for {', '.join(missing)}; run "
                         "hessian_real.py on them first")
    results = {"lambda_max": {m: lambda_max_ceiling(m, real[m], args) for m in args.models},
               "trace": {m: trace_ceiling(m, args) for m in args.trace_models}}
    return save_results("hessian_ceiling", args, info, **results)


if __name__ == "__main__":
    main()
