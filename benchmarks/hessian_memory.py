"""Peak memory of the curvature estimators per stage on real models, under ``--max-memory``.

Builds a model of :mod:`models_real` at random init (eval mode), 8 samples of 3x64x64, a
:class:`~pnnh.probes.hessian.HessianOperator` with the probe's default budget, then runs the
stages of ``pnnh probe hessian`` in order — the gradient graph, Lanczos (``--lanczos-steps``,
by default two steps past the number of vectors the budget keeps, after which its memory is
flat), the trace (``--trace-samples`` HVPs, xtrace as asked: the budget picks what fits) and
SLQ (one run of ``--slq-steps``) — and prints the process's peak RSS (``ru_maxrss``) after
each, with the HVPs and seconds. The peak is the running maximum: a stage's row says how high
the process has been by its end. Run one model per process, and under ``/usr/bin/time -v``
for the kernel's own peak:

    /usr/bin/time -v .venv-ecosystem/bin/python benchmarks/hessian_memory.py --model resnet50

Writes ``benchmarks/results/hessian_memory_<model>.json``. ``--quick``: the tiny CNN, a few
steps (no torchvision needed).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import machine_info, save_results  # noqa: E402
from models_real import MODELS  # noqa: E402

from pnnh.probes.hessian import HessianOperator  # noqa: E402
from pnnh.probes.hessian.memory import parse_memory  # noqa: E402


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(MODELS), default="resnet50")
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--max-memory", default="1G")
    p.add_argument("--lanczos-steps", type=int, default=None)
    p.add_argument("--trace-samples", type=int, default=8)
    p.add_argument("--slq-steps", type=int, default=None)
    p.add_argument("--stages", default="hvp,lanczos,trace,slq",
                   help="comma-separated, in this order: hvp (one HVP), lanczos, trace, slq")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.model, args.trace_samples = "tiny_cnn", 4
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load_before = list(os.getloadavg())
    rows = []

    def row(stage: str, t0: float, hvps: int, **extra) -> None:
        rows.append({"stage": stage, "peak_rss_mb": round(peak_mb(), 1), "hvps": hvps,
                     "seconds": round(time.perf_counter() - t0, 2), **extra})
        print(f"{stage:<10} peak RSS {rows[-1]['peak_rss_mb']:8.1f} MB  {hvps:4d} HVPs  "
              f"{rows[-1]['seconds']:7.1f} s  {extra or ''}", flush=True)

    t0 = time.perf_counter()
    model = MODELS[args.model]().eval()
    x = torch.randn(args.samples, 3, args.image_size, args.image_size)
    y = torch.randint(0, 10, (args.samples,))
    op = HessianOperator(model, (x, y), max_memory=parse_memory(args.max_memory))
    kept = op.lanczos_vectors()
    row("setup", t0, 0, params=op.dim, lanczos_vectors=kept, batchnorm_folded=len(op.folded))
    t0 = time.perf_counter()
    op.gradient()
    row("gradient", t0, 0)
    stages = args.stages.split(",")
    if "hvp" in stages:
        t0 = time.perf_counter()
        op.hvp(torch.randn(op.dim))
        row("hvp", t0, 1)
    if "lanczos" in stages:
        steps = args.lanczos_steps or (4 if args.quick else kept + 2)
        t0, calls = time.perf_counter(), op.hvp_calls
        ext = op.extreme_eigenvalues(tol=0.0, max_iter=steps)
        row("lanczos", t0, op.hvp_calls - calls, lambda_max=ext["lambda_max"],
            reorthogonalisation=ext["reorthogonalisation"])
    if "trace" in stages:
        t0, calls = time.perf_counter(), op.hvp_calls
        tr = op.trace(args.trace_samples, method="xtrace")
        row("trace", t0, op.hvp_calls - calls, trace_method=tr["trace_method"],
            trace_plan=tr.get("trace_plan"))
    if "slq" in stages:
        t0, calls = time.perf_counter(), op.hvp_calls
        op.spectral_density(1, args.slq_steps or (4 if args.quick else kept + 2))
        row("slq", t0, op.hvp_calls - calls)
    info = {**machine_info(), "loadavg_before": load_before}
    return save_results(f"hessian_memory_{args.model}", args, info, rows=rows)


if __name__ == "__main__":
    main()
