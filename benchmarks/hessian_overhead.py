"""pnnh's own overhead on λmax: a cold call against the bare autograd cost of the HVPs it used.

    OMP_NUM_THREADS=1 .venv-ecosystem/bin/python benchmarks/hessian_overhead.py [--quick]
        [--models resnet18 resnet50 convnext_tiny efficientnet_b0] [--bounds residual gap]
        [--allocators default cli] [--reorth partial full] [--tol 1e-3] [--repeats 2]
        [--profile]

For each model of ``hessian_real.py`` (torchvision at random init, 8 seeded 3x64x64 samples,
cross-entropy, float32) and each bound: in a fresh process, ``T`` = the wall time of a cold
``HessianOperator(model, (x, y), "ce").extreme_eigenvalues(tol, which="max", bound,
reorth)`` (operator construction included; ``reorth``: partial, the default, and full, side
by side) and ``k`` = the HVPs it used; in other fresh processes, the
bare autograd setup ``S`` (forward + backward with ``create_graph``) and the median HVP ``h``
(a double backward), as ``hessian_ceiling.py`` measures them. Printed: ``T / (S + k·h)``, the
factor pnnh adds on top of the HVPs it chose to pay (issue #32's target: at most 1.15), and the
part of ``T`` outside its HVPs. Best of ``--repeats`` processes on each side.

Each side runs under each of ``--allocators``: ``default`` (glibc as a Python process has it:
a library call) and ``cli`` (glibc set as the ``pnnh`` command sets it,
:func:`pnnh.allocator.retain_freed_memory`). A ``cli`` row prints two ratios: against the bare
cost under the default allocator (the limit as ``hessian_ceiling.py`` measures it) and against
the bare cost under the same setting (what the setting would give bare autograd too). Writes
``benchmarks/results/hessian_overhead.json``. ``--profile``: instead, one call per model and
allocator under cProfile, printing the seconds in each part of a Lanczos step against those in
the HVPs (``hessian_overhead_profile.json``).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import hessian_ceiling  # noqa: E402
from _util import machine_info, save_results  # noqa: E402
from hessian_real import MODELS, Clock, problem, run_worker, use_allocator  # noqa: E402
from models_real import MODELS as ALL_MODELS  # noqa: E402


def pnnh_worker(spec: dict) -> dict:
    """In a fresh process: one cold λmax call, timed from the operator's construction."""
    from pnnh.probes.hessian import HessianOperator

    use_allocator(spec)
    torch.set_num_threads(spec["threads"])
    model, x, y = problem(spec["model"], spec["batch"])
    clock = Clock()
    profiler = cProfile.Profile() if spec.get("profile") else None
    if profiler is not None:
        profiler.enable()
    clock.start = time.perf_counter()
    op = HessianOperator(model, (x, y), "ce", progress=False)
    op.hvp = clock.wrap(op.hvp)
    r = op.extreme_eigenvalues(tol=spec["tol"], max_iter=200, which="max", bound=spec["bound"],
                               reorth=spec.get("reorth", "partial"))
    prof = clock.profile(time.perf_counter())
    out = {"seconds": prof["seconds"], "hvps": prof["hvps"], "hvp_seconds": sum(prof["per_hvp"]),
           "lambda_max": r["lambda_max"], "converged": r["converged"],
           "error_bound_max": r["error_bound_max"],
           "reorthogonalisation": r["reorthogonalisation"]}
    if profiler is not None:
        profiler.disable()
        out["profile"] = where_the_time_goes(pstats.Stats(profiler))
    return out


PARTS = {  # (file or "~" for builtins, function) -> what it is in a Lanczos step
    ("~", "<method 'run_backward' of 'torch._C._EngineBase' objects>"):
        "autograd backward passes (the setup's and the HVPs')",
    ("lanczos.py", "_dots"): "float64 dots, all (alpha, Gram-Schmidt coefficients, norms)",
    ("lanczos.py", "_orthogonalise"):
        "Gram-Schmidt passes over the kept rows (their dots, and w -= Q^T c)",
    ("lanczos.py", "_measured_residuals"):
        "the residuals measured at the stop (partial: one sweep over the basis)",
    ("lanczos.py", "_update_and_norm"): "w -= alpha q_j + beta q_j-1, and ||w||, one pass (partial)",
    ("~", "<built-in method torch.div>"): "q_j+1 = w / beta",
    ("operator.py", "_hvp_rev_rev"): "HVPs, each with its copy into its Lanczos row",
}


def where_the_time_goes(stats: pstats.Stats) -> dict:
    """Seconds (cumulative, calls) of the parts of one call named in ``PARTS`` (zero where a
    part did not run: Gram-Schmidt passes in a partial run that needed none)."""
    out = {label: {"seconds": 0.0, "calls": 0} for label in PARTS.values()}
    for (file, _, func), (_, calls, _, cum, _) in stats.stats.items():
        for (want_file, want_func), label in PARTS.items():
            if func == want_func and (want_file == "~" or file.endswith(want_file)):
                out[label] = {"seconds": cum, "calls": calls}
    return out


def measure(name: str, args) -> dict:
    spec = {"model": name, "batch": args.batch, "threads": args.threads, "hvps": args.hvps}
    bare, rows = {}, []
    for alloc in args.allocators:
        runs = [run_worker({**spec, "allocator": alloc}, script=hessian_ceiling.__file__)["cold"]
                for _ in range(args.repeats)]
        bare[alloc] = {"runs": runs, "best": min(runs, key=lambda b: b["setup"] + b["hvp"])}
    ref = bare["default" if "default" in bare else args.allocators[0]]["best"]
    for alloc in args.allocators:
        same = bare[alloc]["best"]
        for bound, reorth in [(b, o) for o in args.reorth for b in args.bounds]:
            calls = [run_worker({**spec, "tol": args.tol, "bound": bound, "allocator": alloc,
                                 "reorth": reorth}, script=__file__)
                     for _ in range(args.repeats)]
            c = min(calls, key=lambda r: r["seconds"])
            limit = ref["setup"] + c["hvps"] * ref["hvp"]
            limit_same = same["setup"] + c["hvps"] * same["hvp"]
            row = {"bound": bound, "allocator": alloc, "reorth": reorth, **c, "bare_setup": ref["setup"],
                   "bare_hvp": ref["hvp"], "bare_limit": limit, "ratio": c["seconds"] / limit,
                   "bare_limit_same_allocator": limit_same,
                   "ratio_same_allocator": c["seconds"] / limit_same,
                   "outside_hvps": c["seconds"] - c["hvp_seconds"]}
            rows.append(row)
            print(f"{name:<16} {bound:<8} {reorth:<7} {alloc:<7} T {c['seconds']:6.2f} s  "
                  f"k {c['hvps']:3d}  "
                  f"S {ref['setup']:5.2f} s  h {ref['hvp']:5.2f} s  S+k·h {limit:6.2f} s  "
                  f"ratio {row['ratio']:.2f}x  (bare under the same allocator {limit_same:6.2f} s: "
                  f"{row['ratio_same_allocator']:.2f}x)  HVPs in the call "
                  f"{c['hvp_seconds'] / max(c['hvps'], 1):5.3f} s each, outside them "
                  f"{row['outside_hvps']:.2f} s  [{c['reorthogonalisation']}]", flush=True)
    return {"bare": bare, "rows": rows}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--models", nargs="+", choices=list(ALL_MODELS), default=list(MODELS))
    ap.add_argument("--bounds", nargs="+", choices=["residual", "gap"],
                    default=["residual", "gap"])
    ap.add_argument("--allocators", nargs="+", choices=["default", "cli"],
                    default=["default", "cli"])
    ap.add_argument("--reorth", nargs="+", choices=["partial", "full"],
                    default=["partial", "full"])
    ap.add_argument("--tol", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2, help="fresh processes per measurement")
    ap.add_argument("--hvps", type=int, default=5, help="bare HVPs timed per process")
    ap.add_argument("--out", type=Path, default=None, help="results directory")
    ap.add_argument("--quick", action="store_true", help="smoke run: the tiny CNN, 1 repeat")
    ap.add_argument("--profile", action="store_true",
                    help="instead: one call per model and allocator under cProfile, and where "
                         "its time goes (Lanczos's parts against the HVPs)")
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(pnnh_worker(json.loads(args.worker))))
        return {}
    if args.quick:
        args.models, args.repeats, args.hvps, args.batch = ["tiny_cnn"], 1, 2, 2
    if args.profile:  # one profiled call per model and allocator, where its time goes
        prof = {}
        for name in args.models:
            for alloc in args.allocators:
                r = run_worker({"model": name, "batch": args.batch, "threads": args.threads,
                                "tol": args.tol, "bound": args.bounds[0], "allocator": alloc,
                                "reorth": args.reorth[0], "profile": True}, script=__file__)
                prof[f"{name} {alloc}"] = r
                print(f"{name} ({alloc} allocator): {r['seconds']:.2f} s, {r['hvps']} HVPs "
                      "(under cProfile)")
                for label, v in sorted(r["profile"].items(), key=lambda kv: -kv[1]["seconds"]):
                    print(f"  {v['seconds']:6.3f} s  {v['calls']:5d} calls  {label}")
        return save_results("hessian_overhead_profile", args, machine_info(), calls=prof)
    info = machine_info()
    return save_results("hessian_overhead", args, info,
                        models={m: measure(m, args) for m in args.models})


if __name__ == "__main__":
    main()
