"""The deep-plain depth gap over several seeds, with the test set's sampling noise counted.

Each argument is the ``--out`` directory of one ``pnnh reproduce deep-plain --seed N`` run.
The 100- and 1000-layer nets of every seed are scored on the same test examples, so a
standard error over seeds covers training noise only; this prints it beside the test set's
own sampling error and a two-way bootstrap interval (seeds and examples resampled), see
:func:`pnnh.reproduce.deep_plain.seed_statistics`. Writes
``benchmarks/results/deep_plain_seeds.json``. Run (docs/REPRODUCTION.md):
``.venv/bin/python benchmarks/deep_plain_seeds.py runs/deep-plain-s0 ... runs/deep-plain-s4``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pnnh.errors import PnnhError
from pnnh.reproduce.deep_plain import format_statistics, seed_statistics

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import machine_info, save_results  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="deep-plain output directories, one per seed")
    ap.add_argument("--boots", type=int, default=4000, help="bootstrap draws")
    ap.add_argument("--fresh", type=int, default=0, metavar="N",
                    help="score on N fresh MNIST-1D examples instead of the standard test split")
    ap.add_argument("--fresh-seed", type=int, default=2026, help="generator seed of --fresh")
    ap.add_argument("--out", type=Path, help="results directory (default benchmarks/results)")
    ap.add_argument("--name", default="deep_plain_seeds", help="results file name")
    args = ap.parse_args(argv)
    try:
        st = seed_statistics(args.runs, boots=args.boots, fresh=args.fresh,
                            fresh_seed=args.fresh_seed)
    except PnnhError as e:  # a directory that is not a finished run: one line, exit 2
        ap.exit(2, f"{ap.prog}: error: {e}\n")
    print(format_statistics(st))
    args.runs = [str(r) for r in args.runs]
    return save_results(args.name, args, machine_info(), **st)


if __name__ == "__main__":
    main()
