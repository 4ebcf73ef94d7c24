"""Paper experiments, runnable as ``pnnh reproduce NAME [--scale quick|cpu|paper] --out DIR``.

Each experiment is a module in this package exposing:

- ``DESCRIPTION``: one line;
- ``CPU_MINUTES``: expected run time at ``--scale cpu`` on 2 CPU cores;
- ``run(out: Path, scale: str, device: str, seed: int) -> dict``: writes its CSV/JSON/PNG files
  under ``out`` (atomically) and returns a summary dict (also written as ``out/summary.json``);
- optionally ``aggregate(seed_dirs: list[Path]) -> dict``: the statistics over several seeds'
  outputs, which ``pnnh reproduce NAME --seeds S1 S2 ...`` (:func:`run_seeds`) writes and prints.

Every experiment has the three :data:`SCALES`: ``paper`` (the paper's setting, usually a GPU),
``cpu`` (the default: minutes on 2 CPU cores, the numbers in docs/) and ``quick`` (test size:
seconds, every part of the experiment and every output file, numbers meaningless). ``quick``
is what ``PNNH_QUICK=1`` selects (:func:`pnnh.cli.apply_quick`), so the documented
``pnnh reproduce`` commands, and ``pnnh report`` on their output, run in the test suite
(tests/test_docs_commands.py).
"""

from __future__ import annotations

import importlib
from pathlib import Path

from pnnh.errors import ConfigError
from pnnh.io import atomic_write_json

SCALES = ("quick", "cpu", "paper")

EXPERIMENTS = {
    "dissipation": "pnnh.reproduce.dissipation",
    "norm-preservation": "pnnh.reproduce.norm_preservation",
    "shortcut-depth": "pnnh.reproduce.shortcut_depth",
    "pnnh-accuracy": "pnnh.reproduce.pnnh_accuracy",
    "deep-plain": "pnnh.reproduce.deep_plain",
    "image-depth": "pnnh.reproduce.image_depth",
    "image-vit": "pnnh.reproduce.image_vit",
    "shortcut-depth-images": "pnnh.reproduce.shortcut_depth_images",
}


def experiment(name: str):
    if name not in EXPERIMENTS:
        raise ConfigError(
            f"unknown experiment {name!r}; known: {', '.join(sorted(EXPERIMENTS))}", field="name"
        )
    return importlib.import_module(EXPERIMENTS[name])


def describe() -> str:
    lines = []
    for name in sorted(EXPERIMENTS):
        mod = experiment(name)
        lines.append(f"{name:<20} ~{mod.CPU_MINUTES:>4} min (cpu)  {mod.DESCRIPTION}")
    return "\n".join(lines)


def run(name: str, out: str | Path, scale: str = "cpu", device: str = "auto", seed: int = 0) -> dict:
    if scale not in SCALES:
        raise ConfigError(f"scale: must be one of {', '.join(SCALES)}, got {scale!r}",
                          field="scale")
    mod = experiment(name)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary = mod.run(out=out, scale=scale, device=device, seed=seed)
    summary = {"experiment": name, "scale": scale, **(summary or {})}
    atomic_write_json(out / "summary.json", summary)
    return summary


def run_seeds(name: str, out: str | Path, seeds: list[int], scale: str = "cpu",
              device: str = "auto") -> dict:
    """:func:`run` once per seed, into ``out/s<seed>`` (finished training runs found there are
    reused), then the experiment's ``aggregate`` over them, written to ``out/seeds.json``."""
    mod = experiment(name)
    if not hasattr(mod, "aggregate"):
        raise ConfigError(f"seeds: {name!r} has no multi-seed summary; run it once per seed "
                          "with --seed N", field="seeds")
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds: one or more distinct seeds, got {list(seeds)}", field="seeds")
    dirs = []
    for seed in seeds:
        dirs.append(Path(out) / f"s{seed}")
        run(name, dirs[-1], scale=scale, device=device, seed=seed)
    summary = {"experiment": name, "scale": scale, "seed_values": list(seeds),
               **mod.aggregate(dirs)}
    atomic_write_json(Path(out) / "seeds.json", summary)
    return summary
