"""``pnnh demo``: the depth study on MNIST-1D — plain vs ResNet vs PNNH MLPs at several depths.

Every network is trained with the same recipe (AdamW, cosine schedule, batch 128), then probed
at initialisation and after training — dissipation (how much of the input survives each block)
and gradient-norm ratios per block — and everything is assembled by :func:`pnnh.report.build_report`
into ``OUT/report.html``. The MLP family is used because it is the one the design's prototype
measured, and it is fast enough on two CPU cores to run at 100 layers in minutes.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pnnh.checkpoint import load_model
from pnnh.errors import TrainingDiverged
from pnnh.io import atomic_write_json, write_records
from pnnh.models import create_model
from pnnh.probes.common import probe_batch
from pnnh.probes.plots import plot_metric_vs_layer
from pnnh.report import build_report
from pnnh.train import train

# (registry name, options). The ResNet starts its residual branches at zero (Goyal et al.; the
# registry default), the counterpart of PNNH's zero-init learner decoder: with He init on both
# branch layers and no normalisation, a 100-layer post-activation residual MLP diverges
# (docs/PNNH.md §5). PNNH at its defaults (fixed coder, learner width = width) has exactly the
# ResNet's parameters, so the three nets have equal parameter counts.
MODELS = (("plain_mlp", {}), ("resnet_mlp", {"zero_init_residual": True}), ("pnnh_mlp", {}))


@dataclass(frozen=True)
class DemoPlan:
    depths: tuple[int, ...]
    epochs: int
    width: int
    num_samples: int | None  # MNIST-1D size (None: the default 10,000)
    probe_samples: int
    max_steps_per_epoch: int | None = None


FULL = DemoPlan(depths=(8, 32, 100), epochs=15, width=128, num_samples=None, probe_samples=1000)
QUICK = DemoPlan(depths=(4, 12), epochs=1, width=32, num_samples=600, probe_samples=128,
                 max_steps_per_epoch=4)


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _probe(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, label: str, stage: str,
           depth: int) -> tuple[list[dict], list[dict]]:
    from pnnh.probes.dissipation import dissipation
    from pnnh.probes.norms import norms

    model.eval()
    extra = {"model": label, "net_depth": depth, "stage": stage}
    dis = [{**extra, **r} for r in dissipation(model, x)]
    nrm = [{**extra, **r} for r in norms(model, (x, y))]
    return dis, nrm


def run_demo(out: str | Path = "runs/demo", quick: bool = False, seed: int = 0) -> dict:
    """Train, probe and report; returns ``{"report": path, "rows": accuracy rows}``."""
    plan = QUICK if quick else FULL
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    x, y, val = probe_batch("mnist1d", None, plan.probe_samples, seed)
    if plan.num_samples is not None:  # the quick plan trains on a smaller MNIST-1D
        x, y, val = _quick_batch(plan, seed)
    jobs = [(m, opts, d) for d in plan.depths for m, opts in MODELS]
    rows, dis_all, nrm_all = [], [], []
    for i, (name, opts, depth) in enumerate(jobs, 1):
        _say(f"[{i}/{len(jobs)}] {name}-{depth}: training {plan.epochs} epochs "
             f"({time.perf_counter() - start:.0f}s elapsed)")
        row, dis, nrm = _train_and_probe(name, opts, depth, plan, out, (x, y, val), seed)
        rows.append(row)
        dis_all += dis
        nrm_all += nrm
    _write_probes(out / "probes", plan, dis_all, nrm_all)
    write_records(rows, out, "accuracy")
    atomic_write_json(out / "report.json", _report_meta(plan, quick))
    report = build_report(out)
    elapsed = time.perf_counter() - start
    _print_table(rows, elapsed)
    print(f"\nreport: {report}")
    return {"report": str(report), "rows": rows, "seconds": elapsed}


def _train_and_probe(name: str, opts: dict, depth: int, plan: DemoPlan, out: Path, batch,
                     seed: int) -> tuple[dict, list[dict], list[dict]]:
    """One net: probe it at initialisation, train it (a divergence is a row, not an error),
    probe its last checkpoint; returns its accuracy row and its probe records."""
    x, y, val = batch
    label = f"{name}-{depth}"
    run_dir = out / "train" / label
    torch.manual_seed(seed)
    init_model = create_model(name, in_shape=val.input_shape, num_classes=val.num_classes,
                              depth=depth, width=plan.width, **opts)
    dis, nrm = _probe(init_model, x, y, label, "init", depth)
    cfg = dict(model=name, dataset="mnist1d", depth=depth, width=plan.width, epochs=plan.epochs,
               batch_size=128, lr=1e-3, optimizer="adamw", schedule="cosine", seed=seed,
               out=str(run_dir), num_samples=plan.num_samples, progress=False,
               max_steps_per_epoch=plan.max_steps_per_epoch, device="cpu", model_args=opts)
    try:
        summary = train(cfg)
        status = "finished"
    except TrainingDiverged as e:
        _say(f"    {label} diverged: {e}")
        summary, status = {"best_val_acc": None, "final_val_acc": None, "params": None}, "diverged"
    ckpt = run_dir / "checkpoints" / "last.pt"
    if ckpt.exists():
        model, _ = load_model(ckpt)
        dis_t, nrm_t = _probe(model, x, y, label, "trained", depth)
        dis, nrm = dis + dis_t, nrm + nrm_t
    row = {"model": name, "depth": depth, "params": summary.get("params"),
           "best_val_acc": summary.get("best_val_acc"),
           "final_val_acc": summary.get("final_val_acc"), "status": status}
    return row, dis, nrm


def _write_probes(probes: Path, plan: DemoPlan, dis_all: list[dict], nrm_all: list[dict]) -> None:
    """``probes/dissipation.*``, ``probes/norms.*`` and the deepest nets' figures."""
    write_records(dis_all, probes, "dissipation")
    write_records(nrm_all, probes, "norms")
    deepest = max(plan.depths)
    metrics = ["input_r2", "surviving_fraction", "cosine_collapse", "effective_rank"]
    for stage in ("init", "trained"):
        recs = [r for r in dis_all if r["net_depth"] == deepest and r["stage"] == stage]
        if recs:
            plot_metric_vs_layer(recs, metrics, probes / f"dissipation_{stage}.png",
                                 title=f"Dissipation through {deepest}-layer nets ({stage})")
    series = [{**r, "series": f"{r['model']} ({r['stage']})"} for r in nrm_all
              if r["net_depth"] == deepest]
    plot_metric_vs_layer(series, ["ratio"], probes / "norms_ratio.png", group="series", x="index",
                         logy=["ratio"], title=f"Gradient-norm ratio per block, {deepest} layers "
                         "(1 = norm-preserving)")


def _report_meta(plan: DemoPlan, quick: bool) -> dict:
    """``report.json``: the report's title and the paragraph saying what was run."""
    return {
        "title": "pnnh demo — depth study on MNIST-1D",
        "intro": (
            f"Plain, ResNet and PNNH MLPs (width {plan.width}) at depths "
            f"{', '.join(map(str, plan.depths))} (weight layers), each trained for {plan.epochs} "
            "epochs on MNIST-1D with AdamW (lr 1e-3, cosine schedule, batch 128), one seed. "
            "The ResNet's residual branches start at zero (zero_init_residual), as PNNH's "
            "learner decoder does; PNNH at its defaults (fixed coder, learner width = width) "
            "has the ResNet's parameters, so all three nets have the same number of parameters. "
            "In its plain form a PNNH block carries its input across each ReLU through a "
            "weight-shared coder ([A; -A] / [Aᵀ, -Aᵀ]) beside a learner; since AᵀA = I this "
            "computes x, so a PNNH net is, function for function, the zero-init ResNet laid out "
            "as plain layers (docs/PNNH.md, 'The equivalence').\n\n"
            "Probes use a fixed batch of validation inputs, at initialisation and after training: "
            "input R² is a ridge regression from a layer's features back to the input, fitted "
            "on half the batch and scored on the other half; the surviving fraction is the share "
            "of units that are active; the gradient-norm ratio is ‖∂L/∂x_in‖ / ‖∂L/∂x_out‖ per "
            "block (1 = norm-preserving)." + (" QUICK MODE: tiny sizes, numbers are not "
                                              "meaningful." if quick else "")),
    }


def _print_table(rows: list[dict], elapsed: float) -> None:
    print(f"\nDepth study on MNIST-1D ({elapsed:.0f}s)")
    print(f"{'model':<12} {'depth':>5} {'params':>10} {'best_val_acc':>12} {'final_val_acc':>13}")
    for r in rows:
        acc = ("—" if r["best_val_acc"] is None else f"{r['best_val_acc']:.4f}",
               "—" if r["final_val_acc"] is None else f"{r['final_val_acc']:.4f}")
        params = "—" if r["params"] is None else f"{r['params']:,}"
        print(f"{r['model']:<12} {r['depth']:>5} {params:>10} {acc[0]:>12} {acc[1]:>13}")


def _quick_batch(plan: DemoPlan, seed: int):
    from pnnh.data import get_dataset

    _, val = get_dataset("mnist1d", num_samples=plan.num_samples)
    idx = torch.randperm(len(val), generator=torch.Generator().manual_seed(seed))[:plan.probe_samples]
    return val.tensors[0][idx], val.tensors[1][idx], val
