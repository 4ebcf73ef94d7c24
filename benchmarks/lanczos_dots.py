"""The dots of a Lanczos step: pnnh's float64 ones against a float32 sgemv and the old path.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/lanczos_dots.py [--quick] [--rows 5]
        [--dim 11689512]

``rows`` Gaussian float32 rows of ``dim`` entries (ResNet-18's parameter count by default) and a
vector ``w`` with a large component in common with the first row (as a Lanczos ``w`` has with
``q_j`` before the three-term update), one thread. Printed per way of taking ``rows @ w`` and
``‖w‖²``: the best of ``--repeats`` times (the ways taken in turn) and the largest error
against the exact float64 dots, over ``Σ|a_i b_i|``:

- ``pnnh``: ``lanczos._dots`` (slices widened to float64, a float64 matrix-vector product:
  exact products, float64 sums);
- ``sgemv``: ``rows @ w`` in float32 (MKL's or OpenBLAS's order: what Lanczos must not use);
- ``mul to float64``: the previous ``_dots`` (products formed in float32, stored in float64
  through ``torch.mul(..., out=)``, summed in float64).

Writes ``benchmarks/results/lanczos_dots.json``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _util import machine_info, save_results, time_round_robin  # noqa: E402

from pnnh.probes.hessian.lanczos import _dots  # noqa: E402


def mul_to_float64(held: torch.Tensor, w: torch.Tensor, step: int = 2**16) -> torch.Tensor:
    """The previous ``_dots``: float32 products stored in float64 slice by slice, then summed."""
    k = held.shape[0] + 1
    part = torch.empty(k, step, dtype=torch.float64)
    out = torch.zeros(k, dtype=torch.float64)
    for i in range(0, w.shape[0], step):
        m = min(step, w.shape[0] - i)
        torch.mul(held[:, i:i + m], w[i:i + m], out=part[:-1, :m])
        torch.mul(w[i:i + m], w[i:i + m], out=part[-1, :m])
        out += part[:, :m].sum(-1)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=5)
    ap.add_argument("--dim", type=int, default=11_689_512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=None, help="results directory")
    ap.add_argument("--quick", action="store_true", help="smoke run: 2^16 entries, 2 repeats")
    args = ap.parse_args(argv)
    if args.quick:
        args.dim, args.repeats = 2**16, 2
    g = torch.Generator().manual_seed(0)
    held = torch.randn(args.rows, args.dim, generator=g)
    w = torch.randn(args.dim, generator=g) + 3 * held[0]
    both = torch.cat([held, w[None]]).double()
    exact = both @ w.double()
    scale = both.abs() @ w.double().abs()
    ways = {"pnnh": lambda: _dots(held, w, norm=True),
            "sgemv": lambda: torch.cat([held @ w, (w @ w)[None]]).double(),
            "mul to float64": lambda: mul_to_float64(held, w)}
    times = time_round_robin(ways, args.repeats)  # interleaved: the machine's drift shared
    rows = []
    for name, fn in ways.items():
        err = float(((fn() - exact).abs() / scale).max())
        rows.append({"way": name, "seconds": min(times[name]), "error": err})
        print(f"{name:<15} {min(times[name]) * 1e3:8.1f} ms   error / Σ|a_i b_i| {err:.2e}",
              flush=True)
    return save_results("lanczos_dots", args, machine_info(), rows=rows)


if __name__ == "__main__":
    main()
