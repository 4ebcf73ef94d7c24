"""Plots shared by the probes: a metric against depth, one line per model (matplotlib, Agg)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from pnnh.io import save_figure  # noqa: E402


def _groups(records: Sequence[dict], group: str | None) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in records:
        key = str(r.get(group, "")) if group else ""
        out.setdefault(key, []).append(r)
    return out


def plot_metric_vs_layer(
    records: Sequence[dict],
    metrics: Sequence[str],
    path: str | os.PathLike,
    group: str | None = "model",
    x: str = "depth",
    title: str | None = None,
    logy: Sequence[str] = (),
    references: Sequence[dict] = (),
    reference_group: str = "kind",
) -> Path:
    """One panel per metric, ``metric`` against ``x``, a line per value of ``records[i][group]``
    (a single unlabelled line when no record has ``group``). ``references`` (e.g. theory
    curves: dicts with ``x`` and some metrics) are drawn dashed, a line per ``reference_group``.
    ``logy`` names panels drawn on a log scale. The PNG is written atomically."""
    metrics = list(metrics)
    cols = min(len(metrics), 2)
    rows = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.6 * rows), squeeze=False)
    groups = _groups(records, group)
    refs = _groups(references, reference_group)
    for ax, metric in zip(axes.flat, metrics):
        for label, rs in groups.items():
            pts = sorted((r[x], r[metric]) for r in rs if r.get(metric) is not None)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 60
                        else None, label=label or None)
        for label, rs in refs.items():
            pts = sorted((r[x], r[metric]) for r in rs if r.get(metric) is not None)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], linestyle="--", linewidth=1,
                        label=f"theory: {label}" if label else "theory")
        ax.set_xlabel(x.replace("_", " "))
        ax.set_ylabel(metric.replace("_", " "))
        if metric in logy:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(metrics):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)
