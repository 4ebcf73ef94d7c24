"""What this machine charges for memory a process touches for the first time.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/fresh_memory.py [--quick] [--rows 40]
        [--dim 23528522]

A Lanczos run keeps one ``dim``-sized row per step (ResNet-50: 23.5M float32 entries, 94 MB),
each in memory the process has not touched before; bare autograd's HVPs reuse their own
temporaries. So pnnh's cold λmax call pays one first touch of a row per HVP that the bare
limit does not: the kernel maps and zeroes each page (and, in a virtual machine whose host
takes freed guest memory back, the host backs it again first). This times, in this fresh
process, ``--rows`` rows of ``dim`` float32 entries written one after another (each a copy of
one source row into memory never touched), then the same rows again after freeing them
(memory the process had: what a row in memory costs). Printed: milliseconds per row, and the
median per MB over the first and the last quarter of the rows and over the rows taken again.
Writes ``benchmarks/results/fresh_memory.json``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _util import machine_info, save_results  # noqa: E402


def touch_rows(rows: int, dim: int, src: torch.Tensor) -> list[float]:
    """Seconds to copy ``src`` into each of ``rows`` rows of one fresh ``rows × dim`` block."""
    block = torch.empty(rows, dim)
    out = []
    for i in range(rows):
        t = time.perf_counter()
        block[i].copy_(src)
        out.append(time.perf_counter() - t)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=40)
    ap.add_argument("--dim", type=int, default=23_528_522, help="entries per row (ResNet-50's)")
    ap.add_argument("--out", type=Path, default=None, help="results directory")
    ap.add_argument("--quick", action="store_true", help="smoke run: 4 rows of 2^18 entries")
    args = ap.parse_args(argv)
    if args.quick:
        args.rows, args.dim = 4, 2**18
    torch.set_num_threads(1)
    src = torch.randn(args.dim, generator=torch.Generator().manual_seed(0))
    first = touch_rows(args.rows, args.dim, src)  # memory this process never touched
    again = touch_rows(args.rows, args.dim, src)  # the same pages, freed and taken again
    mb = args.dim * 4 / 2**20
    quarter = max(1, args.rows // 4)

    def per_mb(ts: list[float]) -> float:
        return 1e3 * statistics.median(ts) / mb

    summary = {"row_mb": mb, "first_touch_ms": [1e3 * t for t in first],
               "again_ms": [1e3 * t for t in again],
               "first_quarter_ms_per_mb": per_mb(first[:quarter]),
               "last_quarter_ms_per_mb": per_mb(first[-quarter:]),
               "again_ms_per_mb": per_mb(again)}
    print(f"{args.rows} rows of {mb:.0f} MB, one thread; first touch (ms per row):")
    print("  " + " ".join(f"{x:.0f}" for x in summary["first_touch_ms"]))
    print("again, after freeing them (ms per row):")
    print("  " + " ".join(f"{x:.0f}" for x in summary["again_ms"]))
    print(f"median ms per MB: first quarter {summary['first_quarter_ms_per_mb']:.2f}, last quarter "
          f"{summary['last_quarter_ms_per_mb']:.2f}, again {summary['again_ms_per_mb']:.2f}")
    return save_results("fresh_memory", args, machine_info(), **summary)


if __name__ == "__main__":
    main()
