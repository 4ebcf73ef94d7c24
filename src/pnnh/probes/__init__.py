"""Probes, runnable as ``pnnh probe NAME [model and batch options] --out DIR``.

Each probe is a module in this package exposing (the experiments' contract, in
:mod:`pnnh.reproduce`, is the model):

- ``NAME``: its name on the command line and the stem of its files (``OUT/NAME.csv``,
  ``OUT/NAME.json``);
- ``DESCRIPTION``: one line (``pnnh probe --help`` shows it);
- ``add_cli_arguments(parser)``: its own flags (the common ones, ``--model``, ``--checkpoint``,
  ``--dataset``, ``--out``, ..., come from :func:`pnnh.cli.add_probe_common_arguments`);
- ``run(targets, args, out) -> ProbeResult``: measures every
  :class:`~pnnh.probes.common.ProbeTarget`, writes its figures and any extra table under
  ``out`` (atomically) and returns a :class:`~pnnh.probes.common.ProbeResult`: the tidy
  records, their columns, the lines to print, the files it wrote;
- optionally ``prepare(args)``: checks or completes the arguments before the targets are built
  (the Hessian probe turns ``--shortcut/--init`` into model options).

:func:`run_cli` is the one runner: it builds the targets, calls the probe, writes the records
to ``OUT/NAME.csv`` and ``OUT/NAME.json`` with :func:`pnnh.io.write_records`, then prints the
probe's notes. The public computation functions (``dissipation``, ``norms``,
``HessianOperator``, ``jacobian_singular_values``, ...) stay plain functions of a model and a
batch; ``run`` is the thin layer that turns their output into one shape.
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path
from types import ModuleType

from pnnh.errors import ConfigError

PROBES = {
    "dissipation": "pnnh.probes.dissipation",
    "norms": "pnnh.probes.norms",
    "hessian": "pnnh.probes.hessian",
    "jacobian": "pnnh.probes.jacobian",
}


def probe(name: str) -> ModuleType:
    """The probe module registered under ``name`` (a one-line error naming the known ones)."""
    if name not in PROBES:
        raise ConfigError(f"unknown probe {name!r}; known: {', '.join(sorted(PROBES))}",
                          field="probe")
    return importlib.import_module(PROBES[name])


def describe() -> str:
    return "\n".join(f"{name:<12} {probe(name).DESCRIPTION}" for name in sorted(PROBES))


def run_cli(name: str, args: argparse.Namespace):
    """``pnnh probe NAME``: build the targets, run the probe, write ``OUT/NAME.csv``/``.json``,
    print its notes; returns the :class:`~pnnh.probes.common.ProbeResult`."""
    from pnnh.io import write_records
    from pnnh.probes.common import ProbeResult, probe_targets

    mod = probe(name)
    if hasattr(mod, "prepare"):
        mod.prepare(args)
    out = Path(args.out)
    result = mod.run(probe_targets(args), args, out)
    if not isinstance(result, ProbeResult):
        raise TypeError(f"probe {name}: run() returned {type(result).__name__}, not a ProbeResult")
    write_records(result.records, out, mod.NAME, columns=result.columns)
    for line in result.notes:
        print(line)
    return result
