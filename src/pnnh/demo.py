"""``pnnh demo``: the depth study — plain vs ResNet vs PNNH at several depths, on real images.

On Fashion-MNIST (when its IDX files are found: ``make demo`` fetches Debian's package into the
pnnh cache) the registry's CIFAR-layout 2-D CNNs at 20 and 56 layers, trained with the short
SGD schedule of ``pnnh reproduce image-depth``; otherwise, saying why, MNIST-1D with the MLP
family of the design's prototype. Every network is trained with the same recipe, then probed
at initialisation and after training — dissipation (how much of the input survives each block)
and gradient-norm ratios per block — and everything, with a grid of sample images, is
assembled by :func:`pnnh.report.build_report` into ``OUT/report.html``.
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
from pnnh.probes.common import bn_statistics, probe_batch
from pnnh.probes.plots import plot_metric_vs_layer
from pnnh.report import build_report
from pnnh.reproduce.image_depth import TRAIN as IMAGE_DEPTH_TRAIN
from pnnh.train import train

# MLPs, (registry name, options). The ResNet starts its residual branches at zero (Goyal et
# al.), the counterpart of PNNH's zero-init learner decoder without BatchNorm: with He init on
# both branch layers and no normalisation, a 100-layer post-activation residual MLP diverges
# (docs/PNNH.md §5). PNNH at its defaults (fixed coder, learner width = width) has exactly the
# ResNet's parameters, so the three nets have equal parameter counts.
MODELS = (("plain_mlp", {}), ("resnet_mlp", {"zero_init_residual": True}), ("pnnh_mlp", {}))
# BatchNorm CNNs at their registry defaults: the He-init ResNet, and PNNH, which at its defaults
# is that ResNet laid out as plain layers, weight for weight under the same seed
CNN_MODELS = (("plain20", {}), ("resnet20", {}), ("pnnh20", {}))
MLP_TRAIN = {"batch_size": 128, "lr": 1e-3, "optimizer": "adamw", "schedule": "cosine"}
# the short SGD schedule of ``pnnh reproduce image-depth`` (its dataset is the plan's; no norm
# tracking: the demo probes before and after training instead)
CNN_TRAIN = {k: v for k, v in IMAGE_DEPTH_TRAIN.items() if k not in ("dataset", "track_norms")}


@dataclass(frozen=True)
class DemoPlan:
    dataset: str
    models: tuple
    train: dict
    depths: tuple[int, ...]
    epochs: int
    width: int
    num_samples: int | None  # training samples (None: the dataset's default)
    probe_samples: int
    max_steps_per_epoch: int | None = None


FULL = DemoPlan("mnist1d", MODELS, MLP_TRAIN, depths=(8, 32, 100), epochs=15, width=128,
                num_samples=None, probe_samples=1000)
QUICK = DemoPlan("mnist1d", MODELS, MLP_TRAIN, depths=(4, 12), epochs=1, width=32,
                 num_samples=600, probe_samples=128, max_steps_per_epoch=4)
# Fashion-MNIST: 5,000 training images, 2 epochs, the full test split, half the CIFAR width
# (8/16/32 channels) so that the six nets train in minutes here
FASHION = DemoPlan("fashion_mnist", CNN_MODELS, CNN_TRAIN, depths=(20, 56), epochs=2, width=8,
                   num_samples=5000, probe_samples=256)
FASHION_QUICK = DemoPlan("fashion_mnist", CNN_MODELS, CNN_TRAIN, depths=(8,), epochs=1, width=4,
                         num_samples=256, probe_samples=32, max_steps_per_epoch=2)


def choose_plan(quick: bool, dataset: str = "auto") -> tuple[DemoPlan, str]:
    """Fashion-MNIST where its files are found (``dataset="auto"``), else MNIST-1D; with the
    one line that says which and why."""
    from pnnh.data import find_idx_dir
    from pnnh.errors import DataError

    if dataset not in ("auto", "fashion_mnist", "mnist1d"):
        raise DataError(f"demo: dataset auto, fashion_mnist or mnist1d, got {dataset!r}",
                        field="dataset")
    if dataset != "mnist1d":
        try:
            folder = find_idx_dir("fashion_mnist")
            return (FASHION_QUICK if quick else FASHION), f"Fashion-MNIST from {folder}"
        except DataError as e:
            if dataset == "fashion_mnist":
                raise
            why = str(e)
        return (QUICK if quick else FULL), f"MNIST-1D, since Fashion-MNIST is not here: {why}"
    return (QUICK if quick else FULL), "MNIST-1D, as asked"


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _probe(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, label: str, stage: str,
           depth: int) -> tuple[list[dict], list[dict]]:
    """Dissipation and gradient-norm records; a BatchNorm that never saw data normalises with
    the batch's statistics, as on the first training step (:func:`bn_statistics`)."""
    from pnnh.probes.dissipation import dissipation
    from pnnh.probes.norms import norms

    model.eval()
    with bn_statistics(model) as bn:
        extra = {"model": label, "net_depth": depth, "stage": stage, "bn": bn}
        dis = [{**extra, **r} for r in dissipation(model, x)]
        nrm = [{**extra, **r} for r in norms(model, (x, y))]
    return dis, nrm


def run_demo(out: str | Path = "runs/demo", quick: bool = False, seed: int = 0,
             dataset: str = "auto") -> dict:
    """Train, probe and report; returns ``{"report": path, "rows": accuracy rows}``."""
    plan, why = choose_plan(quick, dataset)
    _say(f"demo: {why}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    x, y, val = probe_batch(plan.dataset, None, plan.probe_samples, seed)
    if plan.dataset == "mnist1d" and plan.num_samples is not None:  # quick: a smaller MNIST-1D
        x, y, val = _quick_batch(plan, seed)
    if plan.dataset != "mnist1d":
        sample_grid(plan.dataset, out / "samples.png")
    jobs = [(m, opts, d) for d in plan.depths for m, opts in plan.models]
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
    atomic_write_json(out / "report.json", _report_meta(plan, quick, why))
    report = build_report(out)
    elapsed = time.perf_counter() - start
    _print_table(rows, elapsed, plan.dataset)
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
    cfg = dict(model=name, dataset=plan.dataset, depth=depth, width=plan.width,
               epochs=plan.epochs, seed=seed, out=str(run_dir), num_samples=plan.num_samples,
               progress=False, max_steps_per_epoch=plan.max_steps_per_epoch, device="cpu",
               model_args=opts, **plan.train)
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


def _report_meta(plan: DemoPlan, quick: bool, why: str) -> dict:
    """``report.json``: the report's title and the paragraph saying what was run."""
    depths = ", ".join(map(str, plan.depths))
    if plan.dataset == "mnist1d":
        title = "pnnh demo — depth study on MNIST-1D"
        what = (f"{why}. Plain, ResNet and PNNH MLPs (width {plan.width}) at depths {depths} "
                f"(weight layers), each trained for {plan.epochs} epochs on MNIST-1D with AdamW "
                "(lr 1e-3, cosine schedule, batch 128), one seed. The ResNet's residual branches "
                "start at zero (zero_init_residual), as PNNH's learner decoder does without "
                "BatchNorm; PNNH at its defaults (fixed coder, learner width = width) has the "
                "ResNet's parameters. ")
    else:
        title = "pnnh demo — depth study on Fashion-MNIST"
        n = "all" if plan.num_samples is None else f"{plan.num_samples:,}"
        what = (f"{why}. Plain, ResNet and PNNH 2-D CNNs (CIFAR layout: 3 stages of "
                f"{plan.width}/{2 * plan.width}/{4 * plan.width} channels, BatchNorm) at depths "
                f"{depths}, each trained for {plan.epochs} epochs on {n} training images (a fixed "
                "subset) with SGD (Nesterov momentum 0.9, lr 0.05 after 0.3 epochs of warm-up, "
                "cosine, weight decay 5e-4, batch 128), one seed; accuracy on the 10,000 test "
                "images. The ResNet is the standard He-init one; PNNH at its defaults (fixed "
                "identity coder, learner width = width, the learner's last BatchNorm at scale 1, "
                "the ResNet's learned 1x1 projection at the transitions) is that ResNet laid out "
                "as plain layers: built under the same seed it holds the same weights and "
                "trains to the same numbers, so its curves lie on the ResNet's. The full study, "
                "over seeds and at 110 layers: `pnnh reproduce image-depth` "
                "(docs/REPRODUCTION.md). ")
    return {
        "title": title,
        "intro": (
            what + "In its plain form a PNNH block carries its input across each ReLU through "
            "a weight-shared coder ([A; -A] / [Aᵀ, -Aᵀ]) beside a learner; since AᵀA = I this "
            "computes x, so a PNNH net is, function for function, a ResNet laid out as plain "
            "layers (docs/PNNH.md, 'The equivalence').\n\n"
            "Probes use a fixed batch of test inputs, at initialisation (BatchNorms with the "
            "batch's statistics, as on the first training step) and after training: input R² is "
            "a ridge regression from a layer's features back to the input, fitted on half the "
            "batch and scored on the other half; the surviving fraction is the share of units "
            "that are active; the gradient-norm ratio is ‖∂L/∂x_in‖ / ‖∂L/∂x_out‖ per "
            "block (1 = norm-preserving)." + (" QUICK MODE: tiny sizes, numbers are not "
                                              "meaningful." if quick else "")),
    }


def sample_grid(dataset: str, path: Path, per_class: int = 8) -> Path:
    """A grid of ``per_class`` test images of each class, a row per class, labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pnnh.data import CLASS_NAMES, idx_arrays
    from pnnh.io import save_figure

    images, labels = idx_arrays(dataset)["test"]
    names = CLASS_NAMES.get(dataset, [str(c) for c in range(10)])
    fig, axes = plt.subplots(10, per_class, figsize=(per_class * 0.9, 10 * 0.95))
    for c in range(10):
        idx = [i for i in range(len(labels)) if labels[i] == c][:per_class]
        for k, ax in enumerate(axes[c]):
            ax.imshow(images[idx[k]], cmap="gray_r")
            ax.set_xticks([])
            ax.set_yticks([])
            if k == 0:
                ax.set_ylabel(names[c], rotation=0, ha="right", va="center", fontsize=9)
    fig.suptitle(f"{dataset}: test images, one row per class", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path, dpi=100)


def _print_table(rows: list[dict], elapsed: float, dataset: str) -> None:
    print(f"\nDepth study on {dataset} ({elapsed:.0f}s)")
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
