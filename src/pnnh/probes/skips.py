"""Residual connections and gates of any model, from the command line: ``pnnh probe skips``.

:func:`pnnh.plainness.check_plainness` captures the model's graph (``torch.fx``, else
``torch.export``) on two samples of the probe batch and lists every merge of two paths from one
tensor that cross different numbers of weight layers: additive ones are residual connections
(``identity``: no weight layer on the short side, ``projection``: some), multiplicative ones
are gates (squeeze-excitation's ``x * s(x)``), and a part no capture could see is
``unverified``. One record per skip (``block, kind, source, sink, path, layers, capture``),
and one printed line per model with the counts kept apart: ``6 residual connection(s),
9 gate(s) [torch.fx]``. A model with no record is proven plain.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from pnnh.plainness import check_plainness
from pnnh.probes.common import ProbeResult, ProbeTarget

NAME = "skips"
BATCHNORM = False  # the graph, not the statistics: no --bn, no bn column
DESCRIPTION = "residual connections (identity, projection) and gates, by block"
COLUMNS = ["model", "block", "kind", "source", "sink", "path", "short_layers", "long_layers",
           "capture"]


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--capture", choices=["auto", "fx", "export"], default="auto",
                        help="graph capture: torch.fx, else torch.export where fx cannot see "
                             "the model (auto, the default), or only one of them")


def run(targets: Sequence[ProbeTarget], args: argparse.Namespace, out: Path) -> ProbeResult:
    """One record per skip of every target, and one summary line per model."""
    records, notes = [], []
    for t in targets:
        report = check_plainness(t.model, t.inputs[:2], capture=getattr(args, "capture", "auto"))
        for s in report.skips:
            short, long = s.layers if s.layers else (None, None)
            records.append({"model": t.label, "block": s.block, "kind": s.kind,
                            "source": s.source, "sink": s.sink, "path": " -> ".join(s.path),
                            "short_layers": short, "long_layers": long, "capture": s.capture})
        notes.append(f"{t.label}: {report.summary()}")
    notes.append(f"skips: {out / 'skips.csv'}")
    return ProbeResult(records, COLUMNS, notes, [])
