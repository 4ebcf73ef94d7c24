"""The copy of an HVP's per-parameter products into a flat Lanczos row, two ways.

    OMP_NUM_THREADS=1 .venv-ecosystem/bin/python benchmarks/hvp_copy.py [--quick]
        [--models resnet18 resnet50 convnext_tiny efficientnet_b0] [--repeats 7]

For each model of ``hessian_real.py`` (torchvision at random init, 8 seeded 3x64x64 samples,
cross-entropy): one double-backward HVP as :class:`~pnnh.probes.hessian.HessianOperator`
takes it (per parameter, at the views of the flat leaf), then its products copied into one
``dim``-sized row already in memory, the ways taken in turn, best of ``--repeats``:

- ``copy_``: each product's ``dst.view(shape).copy_(h)`` (the copy before this round);
- ``copy_product``: :func:`pnnh.probes.hessian.operator.copy_product`, which moves a product
  laid out as a transposed matrix (a 1x1 convolution's, from autograd's double backward) of
  ``2¹⁸`` entries or more as a 2-D transpose.

Also printed: how many entries come in a layout other than the parameter's (and of those,
how many as a transposed matrix). Both ways must give the same bits (checked). Writes
``benchmarks/results/hvp_copy.json``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _util import machine_info, save_results, time_round_robin  # noqa: E402
from hessian_real import MODELS, problem  # noqa: E402
from models_real import MODELS as ALL_MODELS  # noqa: E402

from pnnh.probes.hessian import HessianOperator  # noqa: E402
from pnnh.probes.hessian.operator import copy_product  # noqa: E402


def products(name: str, batch: int) -> tuple[list[torch.Tensor], list[torch.Size]]:
    """One HVP's per-parameter products, as autograd returns them, and the parameters' shapes."""
    model, x, y = problem(name, batch)
    op = HessianOperator(model, (x, y), "ce", progress=False)
    parts, g = op._gradient_graph(x, y)
    v = torch.randn(op.dim, generator=torch.Generator().manual_seed(1))
    hv = torch.autograd.grad(g, parts, grad_outputs=v, retain_graph=True, allow_unused=True)
    keep = [(h.detach(), p.shape) for h, p in zip(hv, parts) if h is not None]
    return [h for h, _ in keep], [s for _, s in keep]


def measure(name: str, args) -> dict:
    hs, shapes = products(name, args.batch)
    dim = sum(h.numel() for h in hs)
    row = torch.zeros(dim)

    def copy_with(fn):
        def run():
            start = 0
            for h, shape in zip(hs, shapes):
                fn(row[start:start + h.numel()].view(shape), h)
                start += h.numel()
        return run

    ways = {"copy_": copy_with(lambda d, h: d.copy_(h)), "copy_product": copy_with(copy_product)}
    results = {}
    for way, run in ways.items():
        row.fill_(float("nan"))
        run()
        results[way] = row.clone()
    if not torch.equal(results["copy_"], results["copy_product"]):
        raise AssertionError(f"{name}: copy_product changed the values")
    times = time_round_robin(ways, args.repeats)
    other = sum(h.numel() for h in hs if not h.is_contiguous())
    matrix = sum(h.numel() for h in hs if not h.is_contiguous() and h.squeeze().dim() == 2)
    best = {way: min(ts) for way, ts in times.items()}
    print(f"{name:<16} {dim / 1e6:6.2f}M entries, {other / 1e6:6.2f}M in another layout "
          f"({matrix / 1e6:5.2f}M a transposed matrix): copy_ {1e3 * best['copy_']:6.1f} ms, "
          f"copy_product {1e3 * best['copy_product']:6.1f} ms", flush=True)
    return {"entries": dim, "other_layout": other, "transposed_matrix": matrix,
            "seconds": best, "runs": times}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", choices=list(ALL_MODELS), default=list(MODELS))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", type=Path, default=None, help="results directory")
    ap.add_argument("--quick", action="store_true", help="smoke run: the tiny CNN, 2 repeats")
    args = ap.parse_args(argv)
    if args.quick:
        args.models, args.repeats, args.batch = ["tiny_cnn"], 2, 2
    torch.set_num_threads(1)
    return save_results("hvp_copy", args, machine_info(),
                        models={m: measure(m, args) for m in args.models})


if __name__ == "__main__":
    main()
