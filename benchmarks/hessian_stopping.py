"""Does λmax's stopping rule keep its word on real models? Error against ``tol``, both bounds.

For torchvision's ResNet-18, ResNet-50, ConvNeXt-Tiny and EfficientNet-B0 (the problems of
``benchmarks/hessian_real.py``: random init, 8 seeded 3x64x64 samples, cross-entropy, float32),
``HessianOperator.extreme_eigenvalues(which="max", tol, bound, start)`` at several ``tol`` with
the guaranteed residual bound and the gap (Kato–Temple) estimate. Each call's error is
``|λ − λ_ref| / λ_ref`` against a float64 reference (Lanczos on a float64 copy, residual bound
``1e-8``, from a gradient + random start); a row *breaks its word* when a stop was declared
(``converged``) with an error above the ``tol`` asked for. Prints one line per call and the
count of broken words per bound and start; writes ``benchmarks/results/hessian_stopping.json``.

Run (ecosystem environment: torchvision; about 20 minutes on 2 cores)::

    .venv-ecosystem/bin/python benchmarks/hessian_stopping.py --bounds residual gap
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _util import machine_info, save_results  # noqa: E402
from hessian_real import MODELS, problem  # noqa: E402
from models_real import MODELS as ALL_MODELS  # noqa: E402


def reference(name: str, batch: int) -> dict:
    from pnnh.probes.hessian import HessianOperator

    model, x, y = problem(name, batch)
    op = HessianOperator(copy.deepcopy(model).double(), (x.double(), y), "ce",
                         fold_batchnorm=False, progress=False, max_memory="4G")
    r = op.extreme_eigenvalues(tol=1e-8, max_iter=80, which="max", bound="residual",
                               start="mixed")
    return {"lambda_max": r["lambda_max"], "residual": r["residual_max"],
            "steps": r["iterations"], "converged": r["converged"]}


def calls(name: str, batch: int, ref: float, tols, bounds, starts) -> list[dict]:
    from pnnh.probes.hessian import HessianOperator

    model, x, y = problem(name, batch)
    op = HessianOperator(model, (x, y), "ce", progress=False)
    rows = []
    for start in starts:
        for bound in bounds:
            for tol in tols:
                t = time.perf_counter()
                r = op.extreme_eigenvalues(tol=tol, max_iter=200, which="max", bound=bound,
                                           start=start)
                err = abs(r["lambda_max"] - ref) / abs(ref)
                row = {"model": name, "start": start, "bound": bound, "tol": tol,
                       "lambda_max": r["lambda_max"], "error": err, "hvps": r["hvps"],
                       "converged": r["converged"], "error_bound": r["error_bound_max"] / abs(ref),
                       "broken": bool(r["converged"] and err > tol),
                       "seconds": time.perf_counter() - t}
                print(f"{name:16s} {start:8s} {bound:8s} tol {tol:7.0e}  error {err:8.2e}  "
                      f"hvps {r['hvps']:3d}  {'BROKEN' if row['broken'] else 'ok'}", flush=True)
                rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", choices=list(ALL_MODELS), default=list(MODELS))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tols", type=float, nargs="+", default=[0.1, 0.03, 0.01, 3e-3, 1e-3, 1e-4])
    ap.add_argument("--bounds", nargs="+", default=["residual", "gap"])
    ap.add_argument("--starts", nargs="+", default=["auto"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="results directory")
    ap.add_argument("--quick", action="store_true", help="smoke run: the tiny CNN, two tols")
    args = ap.parse_args(argv)
    if args.quick:
        args.models, args.batch, args.tols = ["tiny_cnn"], 2, [1e-1, 1e-2]
    torch.set_num_threads(args.threads)
    models = {}
    for name in args.models:
        ref = reference(name, args.batch)
        print(f"{name}: reference λmax {ref['lambda_max']:.10g} (residual {ref['residual']:.1e}, "
              f"{ref['steps']} steps)", flush=True)
        models[name] = {"reference": ref, "rows": calls(
            name, args.batch, ref["lambda_max"], args.tols, args.bounds, args.starts)}
    rows = [r for m in models.values() for r in m["rows"]]
    for start in args.starts:
        for bound in args.bounds:
            mine = [r for r in rows if r["bound"] == bound and r["start"] == start]
            print(f"start {start}, bound {bound}: {sum(r['broken'] for r in mine)} of "
                  f"{len(mine)} stops declared with an error above tol")
    return save_results("hessian_stopping", args, machine_info(), models=models)


if __name__ == "__main__":
    main()
