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
  (the Hessian probe turns ``--shortcut/--init`` into model options);
- optionally ``BATCHNORM = False``: the result does not depend on BatchNorm statistics (the
  skips probe reads the graph), so ``--bn`` is not applied and records get no ``bn``;
- optionally ``BN_FIXED = True``: under ``--bn batch`` (or ``auto`` on fresh BatchNorms) the
  probe needs per-sample independence, so the batch's statistics are computed once and held
  fixed (:func:`~pnnh.probes.common.bn_statistics`) instead of recomputed on every forward.

:func:`run_cli` is the one runner: it builds the targets, calls the probe, writes the records
to ``OUT/NAME.csv`` and ``OUT/NAME.json`` with :func:`pnnh.io.write_records`, then prints the
probe's notes. It runs the probe under ``--bn`` (:func:`~pnnh.probes.common.bn_statistics`)
and adds to every record the statistics its BatchNorms used (``bn``).

The public computation functions (``dissipation``, ``norms``, ``HessianOperator``,
``jacobian_singular_values``, ...) stay plain functions of a model and a batch;
``run`` is the thin layer that turns their output into one shape.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import tempfile
from pathlib import Path
from types import ModuleType

from pnnh.errors import ConfigError

PROBES = {
    "dissipation": "pnnh.probes.dissipation",
    "norms": "pnnh.probes.norms",
    "hessian": "pnnh.probes.hessian",
    "jacobian": "pnnh.probes.jacobian",
    "skips": "pnnh.probes.skips",
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
    print its notes; returns the :class:`~pnnh.probes.common.ProbeResult`. Under ``torchrun``
    every rank runs the probe (a data-parallel one, such as the Hessian's, takes part in its
    collectives) and rank 0 alone writes and prints; the others write into a temporary folder
    that is removed after."""
    mod = probe(name)
    if hasattr(mod, "prepare"):
        mod.prepare(args)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and int(os.environ.get("RANK", "0")) != 0:
        with tempfile.TemporaryDirectory(prefix=f"pnnh-{name}-rank{os.environ['RANK']}-") as tmp:
            return _run(mod, args, Path(tmp), quiet=True)  # the same result as rank 0's
    return _run(mod, args, Path(args.out))


def _run(mod: ModuleType, args: argparse.Namespace, out: Path, quiet: bool = False):
    from pnnh.io import write_records
    from pnnh.probes.common import ProbeResult, bn_statistics, probe_targets

    name = mod.NAME
    targets = probe_targets(args)
    bn_mode = getattr(args, "bn", None) or "auto"
    if not getattr(mod, "BATCHNORM", True):  # the probe's result does not depend on statistics
        bn_mode = "running"
    with contextlib.ExitStack() as stack:
        ran = {t.label: stack.enter_context(bn_statistics(
            t.model, bn_mode, t.inputs if getattr(mod, "BN_FIXED", False) else None))
            for t in targets}
        result = mod.run(targets, args, out)
    if not isinstance(result, ProbeResult):
        raise TypeError(f"probe {name}: run() returned {type(result).__name__}, not a ProbeResult")
    if getattr(mod, "BATCHNORM", True):
        for r in result.records:
            r.setdefault("bn", ran.get(r.get("model"), ran[targets[0].label]))
        if result.columns is not None:
            result.columns = [*result.columns, "bn"]
    write_records(result.records, out, mod.NAME, columns=result.columns)
    if quiet:
        return result
    batch = {label: how for label, how in ran.items() if how.startswith("batch")}
    for label, how in batch.items():
        why = "every BatchNorm (--bn batch)" if bn_mode == "batch" else (
            "the BatchNorms whose running statistics never saw data (--bn running to use them)")
        stats = "batch statistics" if how == "batch" else "the probe batch's statistics, held fixed,"
        print(f"{label}: BatchNorm: {stats} for {why}")
    for line in result.notes:
        print(line)
    return result
