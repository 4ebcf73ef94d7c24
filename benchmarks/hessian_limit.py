"""λmax on real models in one table from one run: the bare autograd limit, pnnh, PyHessian and
curvlinops.

    OMP_NUM_THREADS=1 .venv-ecosystem/bin/python benchmarks/hessian_limit.py [--quick]
        [--models resnet18 resnet50 convnext_tiny efficientnet_b0] [--repeats 1]

For each model of ``hessian_real.py`` (torchvision at random init, 8 seeded 3x64x64 samples,
cross-entropy, float32, 1 thread), in this one run:

1. the float64 reference λmax and every contender's cold and warm call in fresh processes
   (``hessian_real.bench_lambda_max``: PyHessian's power iteration at ``--pyh-tols``, pnnh's
   Lanczos at ``--our-tols``, curvlinops' ARPACK at ``--cl-tols``), each call's error
   against the reference;
2. the bare autograd cost of an HVP ``h`` and of the setup ``S`` (the gradient graph), in
   fresh processes (``hessian_ceiling.bare_worker``).

Per PyHessian and curvlinops setting, the table holds the fastest pnnh setting with no larger
error (cold calls), the bare limit ``S + k·h`` of the ``k`` HVPs that pnnh call used, pnnh's
seconds over it (its own overhead), the peer's seconds over pnnh's (the speed-up at equal
error), and ``(S + n·h) / (S + k·h)`` with the peer's ``n`` HVPs: the speed-up an
implementation of Lanczos with no overhead at all would have over a PyHessian with none: where
it is below 2, no exact-HVP implementation can be 2x ahead of PyHessian at that error (both pay
the setup ``S``, and the HVP counts alone decide the rest).
Writes ``benchmarks/results/hessian_limit.json``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import hessian_ceiling  # noqa: E402
from _util import machine_info, save_results  # noqa: E402
from hessian_real import MODELS, bench_lambda_max, run_worker  # noqa: E402
from models_real import MODELS as ALL_MODELS  # noqa: E402


def bare(name: str, args) -> dict:
    """Best of ``--repeats`` fresh processes: the bare cold setup ``S`` and median HVP ``h``."""
    spec = {"model": name, "batch": args.batch, "threads": args.threads, "hvps": args.hvps}
    runs = [run_worker(spec, script=hessian_ceiling.__file__)["cold"]
            for _ in range(args.repeats)]
    return min(runs, key=lambda b: b["setup"] + b["hvp"])


def rows_of(name: str, real: dict, limit: dict) -> list[dict]:
    """One row per peer setting: the peer's cold call and pnnh's fastest at no larger error."""
    s, h = limit["setup"], limit["hvp"]
    calls = {(r["tool"], r["setting"]): r for r in real["rows"]}
    out = []
    for peer in ("pyhessian", "curvlinops"):
        for q in real["equal_error"][f"{peer} cold"]:
            p = calls[(peer, q["setting"])]["cold"]
            row = {"model": name, "peer": peer, "setting": q["setting"], "error": q["error"],
                   "peer_hvps": p["hvps"], "peer_seconds": p["seconds"], "pnnh": q["pnnh"],
                   "bare_setup": s, "bare_hvp": h}
            if q["pnnh"]:
                ours = calls[("pnnh", q["pnnh"])]["cold"]
                k = ours["hvps"]
                row.update(pnnh_error=q["pnnh_error"], pnnh_hvps=k, pnnh_seconds=ours["seconds"],
                           bare_limit=s + k * h, overhead=ours["seconds"] / (s + k * h),
                           speedup=q["ratio"], ceiling=(s + p["hvps"] * h) / (s + k * h))
            out.append(row)
    return out


def table(rows: list[dict]) -> str:
    lines = ["| model | peer, setting (error) | peer HVPs, s | pnnh at ≤ that error (error) | "
             "pnnh HVPs k, s | bare limit S + k·h | pnnh / limit | peer / pnnh | "
             "no-overhead ceiling (S + n·h)/(S + k·h) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        peer = f"{r['model']} | {r['peer']} {r['setting']} ({r['error']:.1e}) | " \
               f"{r['peer_hvps']}, {r['peer_seconds']:.2f} s"
        if not r["pnnh"]:
            lines.append(f"| {peer} | none of pnnh's settings | | | | | |")
            continue
        lines.append(f"| {peer} | {r['pnnh']} ({r['pnnh_error']:.1e}) | {r['pnnh_hvps']}, "
                     f"{r['pnnh_seconds']:.2f} s | {r['bare_limit']:.2f} s | "
                     f"{r['overhead']:.2f}x | {r['speedup']:.2f}x | {r['ceiling']:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", choices=list(ALL_MODELS), default=list(MODELS))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=1, help="fresh processes per call")
    ap.add_argument("--hvps", type=int, default=5, help="bare HVPs timed per process")
    ap.add_argument("--ref-tol", type=float, default=1e-8)
    ap.add_argument("--ref-iter", type=int, default=80)
    ap.add_argument("--pyh-tols", type=float, nargs="+", default=[1e-2, 1e-3])
    ap.add_argument("--our-tols", type=float, nargs="+",
                    default=[1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 1e-4])
    ap.add_argument("--cl-tols", type=float, nargs="+", default=[1e-3])
    ap.add_argument("--out", type=Path, default=None, help="results directory")
    ap.add_argument("--quick", action="store_true", help="smoke run: the tiny CNN, one setting")
    args = ap.parse_args(argv)
    if args.quick:
        args.models, args.batch, args.hvps, args.ref_iter = ["tiny_cnn"], 2, 2, 30
        args.pyh_tols, args.our_tols, args.cl_tols = [1e-2], [1e-2, 1e-3], [1e-2]
    torch.set_num_threads(args.threads)
    info = machine_info()
    rows, models = [], {}
    for name in args.models:
        real = bench_lambda_max(name, args)
        limit = bare(name, args)
        print(f"{name}: bare setup S {limit['setup']:.2f} s, HVP h {limit['hvp']:.3f} s",
              flush=True)
        models[name] = {"lambda_max": real, "bare": limit}
        rows += rows_of(name, real, limit)
    info["loadavg_after"] = machine_info()["loadavg_1_5_15"]
    print(table(rows))
    return save_results("hessian_limit", args, info, rows=rows, table=table(rows), models=models)


if __name__ == "__main__":
    main()
