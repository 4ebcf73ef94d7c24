"""``pnnh report DIR``: one self-contained HTML page (and a Markdown summary) for a results folder.

The report walks ``DIR`` and collects:

- training runs — folders with ``summary.json`` + ``metrics.jsonl`` (from :func:`pnnh.train`):
  an accuracy table, training curves, and each run's ``config.yaml``;
- experiment summaries — ``summary.json`` files with an ``experiment`` key (``pnnh reproduce``);
- every PNG figure (embedded as base64, so the page reads offline) and every CSV table;
- the software versions it was built with.

An optional ``DIR/report.json`` with ``title`` and ``intro`` sets the heading and opening text.
"""

from __future__ import annotations

import base64
import csv
import datetime as _dt
import html
import json
import os
import platform
import sys
from pathlib import Path

from pnnh.errors import PnnhError
from pnnh.io import atomic_write_text, read_jsonl, save_figure

MAX_TABLE_ROWS = 60
_GENERATED = "report_training_curves.png"


def software_versions() -> dict:
    import numpy
    import torch

    from pnnh import __version__

    versions = {
        "pnnh": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cuda": torch.version.cuda if torch.cuda.is_available() else "not available",
    }
    try:
        import matplotlib

        versions["matplotlib"] = matplotlib.__version__
    except ImportError:  # pragma: no cover
        pass
    return versions


def find_runs(root: Path) -> list[dict]:
    runs = []
    for summary_path in sorted(root.rglob("summary.json")):
        d = summary_path.parent
        if not (d / "metrics.jsonl").exists():
            continue
        try:
            summary = json.loads(summary_path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        config = (d / "config.yaml").read_text() if (d / "config.yaml").exists() else ""
        runs.append({"name": str(d.relative_to(root)) or ".", "summary": summary,
                     "metrics": read_jsonl(d / "metrics.jsonl"), "config": config})
    return runs


def find_experiments(root: Path) -> list[dict]:
    out = []
    for p in sorted(root.rglob("summary.json")):
        try:
            s = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(s, dict) and "experiment" in s:
            out.append({"name": str(p.parent.relative_to(root)) or ".", "summary": s})
    return out


def _fmt(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:,.0f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


def accuracy_rows(runs: list[dict]) -> list[dict]:
    rows = []
    for r in runs:
        s = r["summary"]
        rows.append({
            "run": r["name"], "model": s.get("model"), "depth": s.get("depth"),
            "params": s.get("params"), "epochs": len(r["metrics"]),
            "best_val_acc": s.get("best_val_acc"), "final_val_acc": s.get("final_val_acc"),
            "status": s.get("status", "finished"), "time_s": s.get("time_s"),
        })
    return rows


def _plot_curves(runs: list[dict], path: Path) -> Path | None:
    runs = [r for r in runs if r["metrics"]]
    if not runs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for r in runs:
        ep = [m["epoch"] for m in r["metrics"]]
        marker = "o" if len(ep) < 20 else None  # a one-epoch run is still visible
        ax1.plot(ep, [m["train_loss"] for m in r["metrics"]], marker=marker, ms=3, label=r["name"])
        ax2.plot(ep, [m["val_acc"] for m in r["metrics"]], marker=marker, ms=3, label=r["name"])
    ax1.set(xlabel="epoch", ylabel="training loss", title="Training loss", yscale="log")
    ax2.set(xlabel="epoch", ylabel="validation accuracy", title="Validation accuracy")
    ax2.legend(fontsize=7, loc="best")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def _html_table(header: list[str], rows: list[list], caption: str = "") -> str:
    cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in row) + "</tr>"
                   for row in rows)
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _md_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _read_csv(path: Path) -> tuple[list[str], list[list]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        rows = list(reader)
    if not rows:
        return [], []

    def num(x):
        try:
            v = float(x)
            return int(v) if v.is_integer() and "." not in x and "e" not in x.lower() else v
        except ValueError:
            return x

    return rows[0], [[num(c) for c in r] for r in rows[1:]]


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{border-bottom:2px solid #444;padding-bottom:.2em}h2{margin-top:2em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:1em 0;font-size:.9em}caption{text-align:left;font-weight:600;
padding:.3em 0}th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f0f0f0}td:first-child,th:first-child{text-align:left}
figure{margin:1.5em 0}figure img{max-width:100%;border:1px solid #ddd}
figcaption{font-size:.9em;color:#555}pre{background:#f7f7f7;padding:.6em;overflow-x:auto;font-size:.85em}
.note{color:#666;font-size:.9em}
"""


def _read_meta(root: Path) -> dict:
    """``DIR/report.json`` (optional ``title`` and ``intro``), or ``{}``."""
    if not (root / "report.json").exists():
        return {}
    try:
        return json.loads((root / "report.json").read_text())
    except json.JSONDecodeError as e:
        raise PnnhError(f"report: {root / 'report.json'} is not valid JSON: {e}") from None


def _head(root: Path, title: str, intro: str, versions: dict) -> tuple[list[str], list[str]]:
    now = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
             f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>",
             f"<p class='note'>Generated {now} by pnnh {html.escape(versions['pnnh'])} from "
             f"<code>{html.escape(str(root))}</code>.</p>"]
    md = [f"# {title}", "", f"Generated {now} by pnnh {versions['pnnh']}.", ""]
    if intro:
        parts.append("".join(f"<p>{html.escape(p)}</p>" for p in intro.split("\n\n")))
        md += [intro, ""]
    return parts, md


def _accuracy_section(runs: list[dict]) -> tuple[list[str], list[str]]:
    if not runs:
        return [], []
    acc_header = ["run", "model", "depth", "params", "epochs", "best_val_acc", "final_val_acc",
                  "status", "time_s"]
    rows = [[r[k] for k in acc_header] for r in accuracy_rows(runs)]
    parts = ["<h2 id='accuracy'>Accuracy</h2>",
             _html_table(acc_header, rows, "Training runs (validation accuracy)")]
    return parts, ["## Accuracy", "", _md_table(acc_header, rows), ""]


def _experiments_section(experiments: list[dict]) -> tuple[list[str], list[str]]:
    if not experiments:
        return [], []
    parts, md = ["<h2 id='experiments'>Experiments</h2>"], ["## Experiments", ""]
    for e in experiments:
        flat = [[k, v if not isinstance(v, (dict, list)) else json.dumps(v)[:200]]
                for k, v in e["summary"].items()]
        parts.append(_html_table(["key", "value"], flat, f"{e['name']} — summary"))
        md += [f"### {e['name']}", "", _md_table(["key", "value"], flat), ""]
    return parts, md


def _figures_section(root: Path, curves: Path | None,
                     figures: list[Path]) -> tuple[list[str], list[str]]:
    """Every figure embedded as a base64 PNG: the training curves first, with the data's
    sample grid (``samples.png``) beside them, then the rest."""
    if not (curves or figures):
        return [], []
    samples = [f for f in figures if f == root / "samples.png"]
    rest = [f for f in figures if f not in samples]
    parts, md = ["<h2 id='figures'>Figures</h2>"], ["## Figures", ""]
    row = ([curves] if curves else []) + samples
    captions = {curves: "Training curves of every run", root / "samples.png":
                "The data: test images, one row per class"}
    if row:
        parts.append("<div style='display:flex;flex-wrap:wrap;gap:1em;align-items:flex-start'>")
    for i, fig in enumerate(row + rest):
        rel = str(fig.relative_to(root))
        data = base64.b64encode(fig.read_bytes()).decode("ascii")
        caption = captions.get(fig, rel)
        parts.append(f"<figure><img alt='{html.escape(rel)}' src='data:image/png;base64,{data}'>"
                     f"<figcaption>{html.escape(caption)}</figcaption></figure>")
        if i == len(row) - 1:
            parts.append("</div>")
        md += [f"![{caption}]({rel})", ""]
    return parts, md


def _tables_section(root: Path, tables: list[Path]) -> tuple[list[str], list[str]]:
    """Every CSV as a table (its first :data:`MAX_TABLE_ROWS` rows)."""
    if not tables:
        return [], []
    parts, md = ["<h2 id='tables'>Tables</h2>"], ["## Tables", ""]
    for t in tables:
        header, rows = _read_csv(t)
        if not header:
            continue
        rel = str(t.relative_to(root))
        note = ""
        if len(rows) > MAX_TABLE_ROWS:
            note = f" (first {MAX_TABLE_ROWS} of {len(rows)} rows; full file: {rel})"
            rows = rows[:MAX_TABLE_ROWS]
        parts.append(_html_table(header, rows, rel + note))
        md += [f"- `{rel}`: {len(rows)} rows{note}"]
    return parts, md + [""]


def _tail(runs: list[dict], versions: dict) -> tuple[list[str], list[str]]:
    """The run configurations (HTML only) and the software versions."""
    parts = []
    if runs:
        parts.append("<h2 id='configs'>Run configurations</h2>")
        for r in runs:
            parts.append(f"<details><summary>{html.escape(r['name'])}</summary>"
                         f"<pre>{html.escape(r['config'])}</pre></details>")
    parts.append("<h2 id='versions'>Software</h2>")
    vrows = [[k, v] for k, v in versions.items()]
    parts.append(_html_table(["package", "version"], vrows, "Software versions"))
    parts.append("</body></html>")
    return parts, ["## Software", "", _md_table(["package", "version"], vrows), ""]


def build_report(directory: str | os.PathLike, title: str | None = None) -> Path:
    """Write ``DIR/report.html`` (self-contained) and ``DIR/report.md``; return the HTML path.

    Sections, in order: accuracy of the training runs, experiment summaries, figures, tables,
    run configurations (HTML only), software versions; each empty one is left out.
    """
    root = Path(directory)
    if not root.is_dir():
        raise PnnhError(f"report: directory not found: {root}", field="dir")
    meta = _read_meta(root)
    title = title or meta.get("title") or f"pnnh report — {root.name}"
    runs = find_runs(root)
    experiments = find_experiments(root)
    if not runs and not experiments and not list(root.rglob("*.png")):
        raise PnnhError(f"report: nothing to report in {root} (no runs, experiments or figures)",
                        field="dir")
    curves = _plot_curves(runs, root / _GENERATED) if runs else None
    figures = sorted(p for p in root.rglob("*.png") if p != curves)
    tables = sorted(p for p in root.rglob("*.csv"))
    versions = software_versions()

    parts: list[str] = []
    md: list[str] = []
    for section_html, section_md in (
        _head(root, title, meta.get("intro", ""), versions),
        _accuracy_section(runs),
        _experiments_section(experiments),
        _figures_section(root, curves, figures),
        _tables_section(root, tables),
        _tail(runs, versions),
    ):
        parts += section_html
        md += section_md
    out = atomic_write_text(root / "report.html", "\n".join(parts))
    atomic_write_text(root / "report.md", "\n".join(md))
    return out
