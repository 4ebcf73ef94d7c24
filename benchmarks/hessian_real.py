"""Curvature on real models: pnnh vs PyHessian (and curvlinops) at equal achieved error.

λmax and the trace of the loss Hessian of torchvision's ResNet-18, ResNet-50, ConvNeXt-Tiny and
EfficientNet-B0 (``benchmarks/models_real.py``: random init, 10 classes, eval mode, 8 seeded
Gaussian samples of 3x64x64 with random labels, cross-entropy, float32, 1 thread by default).
Nothing is downloaded; needs the ecosystem environment (``make venv-ecosystem``: torchvision)
and the bench extra (PyHessian, curvlinops).

**A user's one call is the cold one.** Every λmax run is a fresh process that builds the model
and the batch, then times the call twice: ``cold`` (the first call in the process: operator
set-up, the first passes through the model, allocator and kernel warm-up) and ``warm`` (the
same call again). Each run also records its *profile*: the seconds from the call's start to
its first HVP (``setup``: pnnh's operator and the gradient graph, PyHessian's constructor and
gradient graph, curvlinops' operator) and the seconds of each HVP. Runs are interleaved (every
contender once per round, the order rotated) and the best of ``--repeats`` rounds is kept.

Contenders, λmax (each at several tolerances):

- PyHessian ``hessian(model, F.cross_entropy, data).eigenvalues(tol=tol)``: power iteration,
  stopped when two estimates differ by < tol relative;
- pnnh ``HessianOperator(model, (x, y)).extreme_eigenvalues(which="max", bound="gap", tol=tol)``:
  Lanczos from the gradient, stopped on the Kato–Temple estimate;
- curvlinops ``scipy.sparse.linalg.eigsh(HessianLinearOperator(...).to_scipy(), k=1,
  which="LA", tol=tol)`` (ARPACK; ``check_deterministic=False``, which only skips its checks).

Error: ``|λ − λ_ref| / λ_ref`` against a float64 reference (pnnh Lanczos on a float64 copy of the
model and batch, BatchNorm not folded, ``--ref-tol`` on the guaranteed residual bound). The
ratio at equal error: for every PyHessian (or curvlinops) setting, the fastest pnnh setting
whose error is no larger; ``ratio = their seconds / pnnh seconds`` (above 1: pnnh faster),
cold and warm apart.

The trace (``--trace-models``): PyHessian ``trace(maxIter=100, tol)`` (Hutchinson with its
stopping rule), pnnh ``trace(num_samples, method)`` (Hutchinson, Hutch++, XTrace within the
default memory budget), curvlinops ``hutchinson_trace`` and ``xtrace``; each setting over
``--seeds`` seeds in one process after a warm-up call, the error the root-mean-square over the
seeds against a reference: pnnh Hutchinson with ``--ref-samples`` Rademacher samples, whose
standard error is printed beside it (an error well below it is not resolved).

Writes ``benchmarks/results/hessian_real.json``. Run (about an hour on the development CPU)::

    OMP_NUM_THREADS=1 .venv-ecosystem/bin/python benchmarks/hessian_real.py
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _util import machine_info, save_results  # noqa: E402
from hessian_vs_pyhessian import pyhessian_module  # noqa: E402

MODELS = ("resnet18", "resnet50", "convnext_tiny", "efficientnet_b0")


def problem(name: str, batch: int, seed: int = 0):
    """``(model in eval mode, inputs, labels)``, seeded: the same in every process."""
    import models_real

    torch.manual_seed(seed)
    model = models_real.MODELS[name]().eval()
    g = torch.Generator().manual_seed(seed)
    size = models_real.IMAGE_SIZE
    x = torch.randn(batch, 3, size, size, generator=g)
    return model, x, torch.randint(0, models_real.NUM_CLASSES, (batch,), generator=g)


def use_allocator(spec: dict) -> None:
    """In a worker: glibc set as the ``pnnh`` command sets it where ``spec["allocator"]`` is
    ``"cli"`` (:func:`pnnh.allocator.retain_freed_memory`); left as it is otherwise."""
    if spec.get("allocator") == "cli":
        from pnnh.allocator import retain_freed_memory

        retain_freed_memory()


# -- one λmax call per tool, with its HVPs timed ------------------------------------------------
class Clock:
    """Times one call: its start, and the start and end of every HVP inside it."""

    def __init__(self):
        self.start, self.hvps = 0.0, []

    def wrap(self, fn):
        def timed(*a, **k):
            t = time.perf_counter()
            out = fn(*a, **k)
            self.hvps.append((t, time.perf_counter()))
            return out
        return timed

    def profile(self, end: float) -> dict:
        per = [b - a for a, b in self.hvps]
        return {"seconds": end - self.start, "hvps": len(per),
                "setup": (self.hvps[0][0] - self.start) if per else end - self.start,
                "per_hvp": per}


def pnnh_lambda_max(model, x, y, tol: float, clock: Clock) -> float:
    from pnnh.probes.hessian import HessianOperator

    op = HessianOperator(model, (x, y), "ce", progress=False)
    op.hvp = clock.wrap(op.hvp)
    return op.extreme_eigenvalues(tol=tol, max_iter=200, which="max", bound="gap")["lambda_max"]


def pyhessian_lambda_max(model, x, y, tol: float, clock: Clock) -> float:
    ph = pyhessian_module()
    torch.manual_seed(0)  # its random start: the same in the cold and the warm call
    hvp = ph.hessian_vector_product
    ph.hessian_vector_product = clock.wrap(hvp)  # the name its power iteration calls
    try:
        (lam,), _ = ph.hessian(model, F.cross_entropy, data=(x, y), cuda=False).eigenvalues(
            maxIter=100, tol=tol, top_n=1)
    finally:
        ph.hessian_vector_product = hvp
    for p in model.parameters():  # PyHessian leaves .grad with a graph: free it
        p.grad = None
    return float(lam)


def curvlinops_operator(model, x, y):
    from curvlinops import HessianLinearOperator

    params = [p for p in model.parameters() if p.requires_grad]
    return HessianLinearOperator(model, torch.nn.CrossEntropyLoss(), params, [(x, y)],
                                 check_deterministic=False)


def curvlinops_lambda_max(model, x, y, tol: float, clock: Clock) -> float:
    import numpy as np
    from scipy.sparse.linalg import LinearOperator, eigsh

    op = curvlinops_operator(model, x, y).to_scipy()
    timed = LinearOperator(op.shape, matvec=clock.wrap(op.matvec), dtype=op.dtype)
    start = np.random.default_rng(0).standard_normal(op.shape[0])  # ARPACK's start, fixed
    return float(eigsh(timed, k=1, which="LA", tol=tol, v0=start,
                       return_eigenvectors=False)[0])


LAMBDA_MAX = {"pnnh": pnnh_lambda_max, "pyhessian": pyhessian_lambda_max,
              "curvlinops": curvlinops_lambda_max}


def worker(spec: dict) -> dict:
    """In a fresh process: build the problem, run the call cold, then warm; profile both."""
    torch.set_num_threads(spec["threads"])
    model, x, y = problem(spec["model"], spec["batch"])
    out = {}
    for when in ("cold", "warm"):
        clock = Clock()
        clock.start = time.perf_counter()
        value = LAMBDA_MAX[spec["tool"]](model, x, y, spec["tol"], clock)
        out[when] = {"value": value, **clock.profile(time.perf_counter())}
    return out


def run_worker(spec: dict, script: str = __file__) -> dict:
    """``script --worker spec`` in a fresh process: its last line of output, as JSON."""
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"])}
    proc = subprocess.run([sys.executable, script, "--worker", json.dumps(spec)], env=env,
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:  # e.g. curvlinops on an op with no forward-mode derivative
        last = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()][-1:]
        return {"failed": last[0][:200] if last else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- the reference and the comparison ----------------------------------------------------------
def reference_lambda_max(name: str, batch: int, tol: float, max_iter: int) -> dict:
    from pnnh.probes.hessian import HessianOperator

    model, x, y = problem(name, batch)
    op = HessianOperator(copy.deepcopy(model).double(), (x.double(), y), "ce",
                         fold_batchnorm=False, progress=False, max_memory="4G")
    t = time.perf_counter()
    r = op.extreme_eigenvalues(tol=tol, max_iter=max_iter, which="max", bound="residual")
    return {"lambda_max": r["lambda_max"], "residual": r["residual_max"],
            "steps": r["iterations"],
            "converged": r["converged"], "seconds": time.perf_counter() - t}


def equal_error(rows: list[dict], anchor: str, when: str) -> list[dict]:
    """For each ``anchor`` setting, the fastest pnnh setting with no larger error (1% slack)."""
    def err(r):  # a call's own error where it has one (λmax: cold and warm apart)
        return r[when].get("error", r["error"])

    ours = [r for r in rows if r["tool"] == "pnnh"]
    out = []
    for a in (r for r in rows if r["tool"] == anchor):
        ok = [o for o in ours if err(o) <= err(a) * 1.01]
        best = min(ok, key=lambda o: o[when]["seconds"]) if ok else None
        out.append({"anchor": anchor, "setting": a["setting"], "error": err(a),
                    "seconds": a[when]["seconds"], "pnnh": best and best["setting"],
                    "pnnh_error": best and err(best),
                    "pnnh_seconds": best and best[when]["seconds"],
                    "ratio": best and a[when]["seconds"] / best[when]["seconds"]})
    return out


def bench_lambda_max(name: str, args) -> dict:
    ref = reference_lambda_max(name, args.batch, args.ref_tol, args.ref_iter)
    lam = ref["lambda_max"]
    print(f"\n{name}: reference λmax {lam:.9g} (float64, {ref['steps']} Lanczos steps, residual "
          f"bound {ref['residual']:.1e}, {ref['seconds']:.0f} s)", flush=True)
    specs = [{"tool": tool, "tol": tol} for tool, tols in (
        ("pyhessian", args.pyh_tols), ("pnnh", args.our_tols), ("curvlinops", args.cl_tols))
        for tol in tols]
    best: dict[int, dict] = {}
    for r in range(args.repeats):
        k = r % len(specs)
        for i in list(range(k, len(specs))) + list(range(k)):
            spec = {**specs[i], "model": name, "batch": args.batch, "threads": args.threads}
            res = run_worker(spec)
            if "failed" in res:
                best[i] = res
                continue
            for when in ("cold", "warm"):
                kept = best.setdefault(i, {})
                if when not in kept or res[when]["seconds"] < kept[when]["seconds"]:
                    kept[when] = res[when]
    rows, failed = [], []
    for i, spec in enumerate(specs):
        b = best[i]
        if "failed" in b:
            failed.append({**spec, "failed": b["failed"]})
            print(f"  {spec['tool']} tol {spec['tol']:g} failed: {b['failed']}")
            continue
        for when in ("cold", "warm"):
            b[when]["error"] = abs(b[when]["value"] - lam) / abs(lam)
        rows.append({"tool": spec["tool"], "setting": f"tol {spec['tol']:g}", "tol": spec["tol"],
                     "error": b["cold"]["error"], **b})
    print(f"  {'tool':<11} {'setting':<10} {'rel. error':>10} {'HVPs':>5} {'cold s':>8} "
          f"{'setup':>6} {'HVP 1':>6} {'HVP n':>6} {'warm s':>7} {'setup':>6} {'HVP n':>6}")
    for r in rows:
        c, w = r["cold"], r["warm"]
        same = "" if w["hvps"] == c["hvps"] else f"  (warm: {w['hvps']} HVPs)"
        print(f"  {r['tool']:<11} {r['setting']:<10} {r['error']:>10.2e} {c['hvps']:>5} "
              f"{c['seconds']:>8.2f} {c['setup']:>6.2f} {c['per_hvp'][0]:>6.2f} "
              f"{statistics.median(c['per_hvp']):>6.2f} {w['seconds']:>7.2f} {w['setup']:>6.2f} "
              f"{statistics.median(w['per_hvp']):>6.2f}{same}")
    ratios = {f"{anchor} {when}": equal_error(rows, anchor, when)
              for anchor in ("pyhessian", "curvlinops") for when in ("cold", "warm")}
    print_ratios(ratios)
    return {"reference": ref, "rows": rows, "failed": failed, "equal_error": ratios}


def print_ratios(ratios: dict[str, list[dict]]) -> None:
    for key, qs in ratios.items():
        for q in qs:
            got = (f"pnnh {q['pnnh']} (error {q['pnnh_error']:.1e}) -> {q['ratio']:.2f}x"
                   if q["ratio"] else "no pnnh setting reached it")
            print(f"  {key:<16} {q['setting']:<16} (error {q['error']:.1e}): {got}")


# -- the trace --------------------------------------------------------------------------------
def bench_trace(name: str, args) -> dict:
    import curvlinops

    from pnnh.probes.hessian import HessianOperator

    torch.set_num_threads(args.threads)
    model, x, y = problem(name, args.batch)
    t = time.perf_counter()
    ref = HessianOperator(model, (x, y), "ce", progress=False).trace(
        args.ref_samples, method="hutchinson", seed=10_000)
    tr, se = ref["trace"], ref["trace_stderr"]
    print(f"\n{name}: reference trace {tr:.6g} ± {se:.2g} (standard error, {args.ref_samples} "
          f"Hutchinson samples, {time.perf_counter() - t:.0f} s; relative {se / abs(tr):.1e})",
          flush=True)

    ph = pyhessian_module()

    def pyh(tol, seed):
        torch.manual_seed(seed)
        vals = ph.hessian(model, F.cross_entropy, data=(x, y), cuda=False).trace(100, tol)
        for p in model.parameters():
            p.grad = None
        return float(sum(vals) / len(vals)), len(vals), None

    def ours(n, method, seed):  # at the default memory budget: what ran may be a fallback
        r = HessianOperator(model, (x, y), "ce", progress=False).trace(n, seed=seed,
                                                                      method=method)
        return r["trace"], r["hvps"], r["trace_method"]

    def cl(n, method, seed):
        torch.manual_seed(seed)
        fn = {"hutchinson": curvlinops.hutchinson_trace, "xtrace": curvlinops.xtrace}[method]
        return float(fn(curvlinops_operator(model, x, y), n)), n, None

    contenders = {f"pyhessian tol {t:g}": (lambda s, t=t: pyh(t, s)) for t in args.pyh_trace_tols}
    for method, budgets in (("hutchinson", args.hutchinson), ("hutch++", args.hutchpp),
                            ("xtrace", args.xtrace)):
        contenders.update({f"pnnh {method} {n}": (lambda s, n=n, m=method: ours(n, m, s))
                           for n in budgets})
    for method in ("hutchinson", "xtrace"):
        contenders.update({f"curvlinops {method} {n}": (lambda s, n=n, m=method: cl(n, m, s))
                           for n in args.cl_trace})
    ours(2, "hutchinson", 0)  # warm-up: this table is the cost per call, not a cold start
    pyh(1.0, 0)
    rows = []
    names = list(contenders)
    times: dict[str, list[float]] = {n: [] for n in names}
    outs: dict[str, list] = {n: [] for n in names}
    failed = {}
    for s in range(args.seeds):  # one seed per round, the order rotated
        k = s % len(names)
        for n in names[k:] + names[:k]:
            if n in failed:
                continue
            t = time.perf_counter()
            try:
                outs[n].append(contenders[n](s))
            except (NotImplementedError, RuntimeError) as e:  # no forward-mode derivative
                failed[n] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160]}"
                print(f"  {n} failed: {failed[n]}")
                continue
            times[n].append(time.perf_counter() - t)
    for n in (n for n in names if n not in failed):
        errs = [(v - tr) / tr for v, _, _ in outs[n]]
        tool, setting = n.split(" ", 1)
        rows.append({"tool": tool, "setting": setting, "error": math.sqrt(
            sum(e * e for e in errs) / len(errs)), "hvps": sum(h for _, h, _ in outs[n]) / len(
            outs[n]), "warm": {"seconds": sum(times[n]) / len(times[n])},
            "values": [v for v, _, _ in outs[n]], "ran": outs[n][0][2]})
    print(f"  {'tool':<11} {'setting':<16} {'RMS rel. error':>14} {'HVPs':>6} {'s per run':>9}")
    for r in rows:
        ran = "" if r["ran"] in (None, r["setting"].split()[0]) else f"  (ran {r['ran']})"
        print(f"  {r['tool']:<11} {r['setting']:<16} {r['error']:>14.2e} {r['hvps']:>6.0f} "
              f"{r['warm']['seconds']:>9.2f}{ran}")
    ratios = {f"{a} warm": equal_error(rows, a, "warm") for a in ("pyhessian", "curvlinops")}
    print_ratios(ratios)
    return {"reference": {"trace": tr, "stderr": se, "samples": args.ref_samples},
            "rows": rows, "failed": failed, "equal_error": ratios}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    ap.add_argument("--trace-models", nargs="*", choices=MODELS,
                    default=["resnet18", "efficientnet_b0"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--ref-tol", type=float, default=1e-8)
    ap.add_argument("--ref-iter", type=int, default=80)
    ap.add_argument("--pyh-tols", type=float, nargs="+", default=[1e-2, 1e-3, 1e-4])
    ap.add_argument("--our-tols", type=float, nargs="+",
                    default=[1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 1e-4, 1e-6])
    ap.add_argument("--cl-tols", type=float, nargs="+", default=[1e-3])
    ap.add_argument("--seeds", type=int, default=4, help="trace: seeds per setting")
    ap.add_argument("--ref-samples", type=int, default=400, help="trace reference samples")
    ap.add_argument("--pyh-trace-tols", type=float, nargs="+", default=[1e-2, 1e-3])
    ap.add_argument("--hutchinson", type=int, nargs="+", default=[10, 25, 50])
    ap.add_argument("--hutchpp", type=int, nargs="+", default=[30])
    ap.add_argument("--xtrace", type=int, nargs="+", default=[20, 40])
    ap.add_argument("--cl-trace", type=int, nargs="+", default=[20])
    ap.add_argument("--out", type=Path, default=None, help="results directory")
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny model and settings")
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return {}
    if args.quick:
        args.models, args.trace_models, args.batch, args.repeats = ["tiny_cnn"], ["tiny_cnn"], 2, 1
        args.ref_iter, args.pyh_tols, args.our_tols, args.cl_tols = 30, [1e-2], [1e-2], [1e-2]
        args.seeds, args.ref_samples, args.pyh_trace_tols = 2, 20, [1e-2]
        args.hutchinson, args.hutchpp, args.xtrace, args.cl_trace = [4], [6], [6], [6]
    torch.set_num_threads(args.threads)
    info = machine_info()
    results: dict = {"lambda_max": {}, "trace": {}}
    for name in args.models:
        results["lambda_max"][name] = bench_lambda_max(name, args)
    for name in args.trace_models:
        results["trace"][name] = bench_trace(name, args)
    info["loadavg_after"] = machine_info()["loadavg_1_5_15"]
    print(f"\nload average before {info['loadavg_1_5_15']}, after {info['loadavg_after']}")
    return save_results("hessian_real", args, info, **results)


if __name__ == "__main__":
    main()
