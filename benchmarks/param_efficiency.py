"""Parameter efficiency, fairly: accuracy against parameters, each family scaled by its own knob.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/param_efficiency.py [--quick]
        [--families mlp cnn1d] [--epochs 15] [--seeds 3] [--runs DIR] [--plot PNG]

Two families on MNIST-1D: the MLP at depth 100 (width 128) and the 1-D CNN at depth 32
(width 32 channels). Each is trained as a ResNet and as a PNNH net, and each is scaled by its
*own* width knob at ``--scales`` (¼, ½, 1, 2) x the width:

- ResNet: ``branch_width``, the hidden width of every residual branch
  (``relu(x + W2 relu(W1 x + b1) + b2)`` with ``W1: width -> branch_width``), with
  zero-initialised branches (``zero_init_residual=True``, the best ResNet baseline here);
- PNNH: ``learner_width``, the hidden width of the learner beside the coder.

At coder ratio ``r = 1`` with ``AᵀA = I`` the coder path is ``AᵀA x = x`` for every orthogonal
``A``, so a PNNH block computes ``relu(x + D relu(E x + b1) + b2)``: the zero-init ResNet block
with branch width = learner width. The curves can differ only through the parameters the coder
is charged with (``n²`` per block when ``A`` is trained, none when it is a fixed buffer) and the
random draws of the initialisation. The table reads, per PNNH point of mean ``a``, the parameters
each family needs to reach ``a - --tolerance`` (its smallest point that does) and their ratio
ResNet / PNNH (> 1: PNNH needs fewer parameters; the paper claims 2x).

Training (every run the same): AdamW 1e-3, cosine schedule, batch 128, ``--epochs`` epochs,
``--seeds`` seeds, MNIST-1D with ``--num-samples`` samples (80/20 split), scored by the final
validation accuracy. ``--runs DIR`` keeps every run's directory and reuses finished ones, so
several processes (``--families mlp`` / ``--families cnn1d``) can share the work and a last
call with both families assembles the table and the plot without training.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import RESULTS, machine_info, save_results  # noqa: E402

from pnnh.io import save_figure  # noqa: E402
from pnnh.models import count_parameters, create_model  # noqa: E402
from pnnh.train import train_or_reuse  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FAMILIES = {
    "mlp": {"depth": 100, "width": 128},
    "cnn1d": {"depth": 32, "width": 32},
}
KINDS = ("resnet", "pnnh")
QUICK_FAMILIES = {"mlp": {"depth": 6, "width": 16}, "cnn1d": {"depth": 4, "width": 8}}
SCALES = (0.25, 0.5, 1.0, 2.0)


def model_args(kind: str, knob: int) -> dict:
    """The family's own width knob: the ResNet's branch width or PNNH's learner width."""
    if kind == "resnet":
        return {"zero_init_residual": True, "branch_width": knob}
    return {"learner_width": knob}


def train_once(run_dir: Path, cfg: dict) -> dict:
    """Train one configuration into ``run_dir``, or reuse its finished run."""
    return train_or_reuse({**cfg, "out": str(run_dir), "device": "cpu", "progress": False})


def run_cell(args, runs: Path, family: str, kind: str, scale: float, max_steps) -> dict:
    """All seeds of one (family, kind, knob) point: parameters, accuracies, mean ± std."""
    fam = (QUICK_FAMILIES if args.quick else FAMILIES)[family]
    knob = max(1, round(scale * fam["width"]))
    name, kw = f"{kind}_{family}", model_args(kind, knob)
    accs, t0 = [], time.perf_counter()
    for seed in range(args.seeds):
        cfg = {"model": name, "dataset": "mnist1d", "depth": fam["depth"], "width": fam["width"],
               "model_args": kw, "epochs": args.epochs, "batch_size": 128, "lr": 1e-3,
               "optimizer": "adamw", "schedule": "cosine", "seed": seed,
               "num_samples": args.num_samples, "checkpoint_every": args.epochs,
               "max_steps_per_epoch": max_steps}
        s = train_once(runs / f"{name}_d{fam['depth']}_k{knob}_s{seed}", cfg)
        accs.append(100.0 * s["final_val_acc"])
    size = {"depth": fam["depth"], "width": fam["width"], **kw}
    row = {"family": family, "kind": kind, "model": name, "depth": fam["depth"],
           "width": fam["width"], "scale": scale, "knob": knob, "model_args": kw,
           "params": count_parameters(create_model(name, **size)), "val_acc": accs,
           "mean": statistics.mean(accs), "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
           "seconds": round(time.perf_counter() - t0, 1)}
    if kind == "pnnh":  # what the coder costs when A is trained (n² per block) instead of fixed
        trained = create_model(name, **size, coder_constraint="newton_schulz")
        row["params_coder_trained"] = count_parameters(trained)
    return row


def smallest(rows: list[dict], family: str, kind: str, acc: float) -> dict | None:
    """The point of (family, kind) with the fewest parameters whose mean is at least ``acc``."""
    ok = [q for q in rows if (q["family"], q["kind"]) == (family, kind) and q["mean"] >= acc]
    return min(ok, key=lambda q: q["params"]) if ok else None


def match(rows: list[dict], tolerance: float) -> None:
    """Per PNNH point of mean ``a``: the parameters each family needs to reach ``a - tolerance``
    (its smallest point that does), and their ratio ``P_resnet(a) / P_pnnh(a)`` (> 1: PNNH
    reaches that accuracy with fewer parameters; the paper's claim is a ratio of 2)."""
    for r in rows:
        r["resnet_match"] = r["pnnh_match"] = r["param_ratio"] = None
        if r["kind"] != "pnnh":
            continue
        res = smallest(rows, r["family"], "resnet", r["mean"] - tolerance)
        pn = smallest(rows, r["family"], "pnnh", r["mean"] - tolerance)  # r itself qualifies
        r["pnnh_match"] = pn["knob"]
        if res:
            r["resnet_match"], r["param_ratio"] = res["knob"], res["params"] / pn["params"]


def table(rows: list[dict]) -> str:
    """Markdown: one line per (family, knob scale), both kinds side by side."""
    lines = ["| family | knob | ResNet (zero-init) params | ResNet acc % | PNNH params "
             "(A trained) | PNNH acc % | params ResNet / PNNH to reach PNNH acc - tol |",
             "|---|---|---|---|---|---|---|"]
    for fam in FAMILIES:
        for scale in sorted({r["scale"] for r in rows if r["family"] == fam}):
            by = {r["kind"]: r for r in rows if r["family"] == fam and r["scale"] == scale}
            if set(by) != set(KINDS):
                continue
            res, pn = by["resnet"], by["pnnh"]
            ratio = (f"{pn['param_ratio']:.2f} (knobs {pn['resnet_match']} / {pn['pnnh_match']})"
                     if pn["param_ratio"] else "no ResNet point reaches it")
            lines.append(f"| {fam}-{res['depth']} | {scale:g}x = {res['knob']} | "
                         f"{res['params']:,} | {res['mean']:.2f} ± {res['std']:.2f} | "
                         f"{pn['params']:,} ({pn['params_coder_trained']:,}) | "
                         f"{pn['mean']:.2f} ± {pn['std']:.2f} | {ratio} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> Path:
    """Accuracy (mean ± std over seeds) against parameters (log x), one panel per family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fams = [f for f in FAMILIES if any(r["family"] == f for r in rows)]
    fig, axes = plt.subplots(1, len(fams), figsize=(5.5 * len(fams), 4), squeeze=False)
    for ax, fam in zip(axes[0], fams):
        for kind, style in (("resnet", "o-"), ("pnnh", "s--")):
            pts = sorted((r for r in rows if r["family"] == fam and r["kind"] == kind),
                         key=lambda r: r["params"])
            if not pts:
                continue
            label = "ResNet (zero-init), branch width" if kind == "resnet" else \
                "PNNH, learner width"
            ax.errorbar([r["params"] for r in pts], [r["mean"] for r in pts],
                        yerr=[r["std"] for r in pts], fmt=style, capsize=3, label=label)
            for r in pts:
                ax.annotate(f"{r['scale']:g}x", (r["params"], r["mean"]), fontsize=7,
                            textcoords="offset points", xytext=(4, -10 if kind == "pnnh" else 4))
        depth = next(r["depth"] for r in rows if r["family"] == fam)
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters")
        ax.set_ylabel("final validation accuracy (%)")
        ax.set_title(f"{title}: {fam}, depth {depth}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--families", nargs="+", choices=list(FAMILIES), default=list(FAMILIES))
    p.add_argument("--scales", nargs="+", type=float, default=list(SCALES))
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS),
                   help="train only these (processes sharing --runs can split the work)")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--num-samples", type=int, default=10000)
    p.add_argument("--tolerance", type=float, default=0.5, help="accuracy points")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=Path, default=None, help="keep and reuse run directories here")
    p.add_argument("--out", type=Path, default=None, help="results directory")
    p.add_argument("--plot", type=Path, default=None,
                   help="PNG path (default docs/figures/param_efficiency.png; --quick: in --out)")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny nets and data, 2 steps")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    max_steps = None
    if args.quick:
        args.scales, args.epochs, args.seeds, args.num_samples = [0.5, 1.0], 1, 2, 400
        max_steps = 2
    torch.set_num_threads(args.threads)
    load_before = machine_info()["loadavg_1_5_15"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        runs = args.runs or Path(tmp)
        for fam in args.families:  # knob-major: an interrupted run leaves paired points
            for scale in args.scales:
                for kind in args.kinds:
                    rows.append(run_cell(args, runs, fam, kind, scale, max_steps))
                    r = rows[-1]
                    print(f"  {fam} {kind:<6} {scale:g}x (knob {r['knob']}): {r['params']:,} "
                          f"params, {r['mean']:.2f} ± {r['std']:.2f} % ({r['seconds']:.0f} s)",
                          flush=True)
    match(rows, args.tolerance)
    info = {**machine_info(), "loadavg_before": load_before}
    print(f"MNIST-1D ({args.num_samples} samples), {args.epochs} epochs, {args.seeds} seeds, "
          f"AdamW 1e-3 cosine batch 128; final val accuracy (%), mean ± std; ResNet = "
          f"zero-init residual branches; torch {info['torch']}, threads {torch.get_num_threads()}")
    print(table(rows))
    default_png = ROOT / "docs" / "figures" / "param_efficiency.png"
    png = args.plot or ((args.out or RESULTS) / "param_efficiency_quick.png"
                        if args.quick else default_png)
    print(f"wrote {plot(rows, png, f'MNIST-1D, {args.epochs} epochs, {args.seeds} seeds')}")
    ratios = [r["param_ratio"] for r in rows if r["param_ratio"]]
    return save_results("param_efficiency", args, info, results=rows, table=table(rows),
                        plot=str(png), max_param_ratio=max(ratios) if ratios else None)


if __name__ == "__main__":
    main()
