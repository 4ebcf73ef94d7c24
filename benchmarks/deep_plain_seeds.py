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
from pnnh.reproduce.deep_plain import seed_statistics

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
    print(f"{'seed run':<28} {'shallow':>8} {'deep':>8} {'gap (pts)':>10}")
    for run, a, b, g in zip(st["seeds"], st["shallow_acc"], st["deep_acc"], st["gaps_points"]):
        print(f"{Path(run).name:<28} {a:>8.4f} {b:>8.4f} {g:>+10.2f}")
    lo, hi = st["bootstrap_95"]
    print(f"mean gap {st['mean_gap_points']:+.2f} points over {len(st['seeds'])} seeds and "
          f"{st['examples']} test examples ({st['test_sample']}); standard error over seeds "
          f"{st['seed_se_points']:.2f}, "
          f"of the test sample {st['test_sampling_se_points']:.2f}, both (bootstrap) "
          f"{st['bootstrap_se_points']:.2f}: 95% interval {lo:+.2f} to {hi:+.2f}; "
          f"{100 * st['bootstrap_share_within_1pt']:.0f}% of the draws within 1 point; the nets "
          f"disagree on {100 * st['disagreement']:.1f}% of the examples")
    args.runs = [str(r) for r in args.runs]
    return save_results(args.name, args, machine_info(), **st)


if __name__ == "__main__":
    main()
