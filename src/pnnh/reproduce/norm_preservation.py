"""Paper 2 ("Norm-Preservation", Zaeemzadeh et al.): gradient-norm ratios and Procrustes ResNets.

(a) The ratio ``‖∂L/∂x_in‖ / ‖∂L/∂x_out‖`` per block for plain vs ResNet vs PNNH nets:
    - at initialisation, over depths: MNIST-1D MLPs (``plain_mlp``, ``resnet_mlp``,
      ``pnnh_mlp``; real MNIST-1D batch) and the CIFAR CNNs with BatchNorm (``plainN``,
      ``resnetN``, ``pnnhN``; a batch of Gaussian images, train-mode BatchNorm);
    - during training on MNIST-1D (``pnnh train --track-norms``), over depths.
    Paper 2's claims: ResNet blocks are near norm-preserving (ratio ≈ 1), more so as blocks are
    stacked, and during training too; the transition blocks are the exception.
(b) ResNet vs Procrustes ResNet: the staged MLP ResNet (``procrustes_resnet_mlp``) trained on
    MNIST-1D with and without the Procrustes projection / ZCA head (``--scale cpu``), or
    ``resnet110`` vs ``procrustes_resnet110`` on CIFAR-10 (``--scale paper``; the CIFAR batches
    must be in ``$PNNH_DATA_DIR``, default ``data/cifar10``): accuracy and ratio curves.

The summary statistic is the mean over blocks of ``|log ratio|`` (0 = every block exactly
norm-preserving; 0.35 ≈ a factor √2 per block).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from pnnh.io import read_jsonl, save_figure, write_records
from pnnh.models import create_model
from pnnh.probes.common import bn_statistics
from pnnh.probes.norms import norms

DESCRIPTION = "paper 2: per-block gradient-norm ratio (plain/ResNet/PNNH); ResNet vs Procrustes"
CPU_MINUTES = 8

SCALES = {
    # test-sized: seconds, every part and plot (``PNNH_QUICK=1``, the docs-commands test)
    "quick": dict(
        mlp_width=8, init_mlp_depths=[4], init_cnn_depths=[20], cnn_width=2, cnn_batch=4,
        probe_samples=64, num_samples=400, train_depths=[4], train_epochs=1, track_every=1,
        proc=dict(dataset="mnist1d", model="procrustes_resnet_mlp", depth=8, width=16, epochs=1,
                  batch_size=64, lr=1e-3, optimizer="adamw", track_every=2,
                  variants={"resnet": dict(procrustes=False, zca=False),
                            "procrustes+zca": dict(procrustes=True, zca=True)}),
    ),
    "cpu": dict(
        mlp_width=64, init_mlp_depths=[10, 34, 66], init_cnn_depths=[20, 56, 110], cnn_width=16,
        cnn_batch=32, probe_samples=512, num_samples=10000, train_depths=[10, 34, 66],
        train_epochs=6, track_every=10,
        proc=dict(dataset="mnist1d", model="procrustes_resnet_mlp", depth=34, width=128,
                  epochs=15, batch_size=128, lr=1e-3, optimizer="adamw", track_every=10,
                  variants={"resnet": dict(procrustes=False, zca=False),
                            "procrustes": dict(procrustes=True, zca=False),
                            "procrustes+zca": dict(procrustes=True, zca=True)}),
    ),
    "paper": dict(
        mlp_width=128, init_mlp_depths=[10, 34, 66, 130, 258], init_cnn_depths=[20, 56, 110],
        cnn_width=16, cnn_batch=128, probe_samples=1000, num_samples=10000,
        train_depths=[10, 34, 66, 130], train_epochs=30, track_every=20,
        proc=dict(dataset="cifar10", depth=110, epochs=164, batch_size=128, lr=0.1,
                  optimizer="sgd", weight_decay=1e-4, track_every=200,
                  variants={"resnet": dict(model="resnet110"),
                            "procrustes+zca": dict(model="procrustes_resnet110")}),
    ),
}

# label -> (registered model, model_args)
MLP_MODELS = {
    "plain_mlp": ("plain_mlp", {}),
    "resnet_mlp": ("resnet_mlp", {}),
    "resnet_mlp_zero_init": ("resnet_mlp", {"zero_init_residual": True}),
    "pnnh_mlp": ("pnnh_mlp", {}),
}
CNN_MODELS = ["plain", "resnet", "pnnh"]


def mean_abs_log(ratios) -> float:
    vals = [abs(math.log(r)) for r in ratios if r is not None and math.isfinite(r) and r > 0]
    return sum(vals) / len(vals) if vals else float("nan")


def _init_ratios(cfg: dict, seed: int, device: str) -> list[dict]:
    from pnnh.data import get_dataset

    _, val = get_dataset("mnist1d", num_samples=cfg["num_samples"])
    n = min(cfg["probe_samples"], len(val))
    x, y = val[torch.arange(n)]
    records = []
    for label, (name, margs) in MLP_MODELS.items():
        for depth in cfg["init_mlp_depths"]:
            torch.manual_seed(seed)
            m = create_model(name, depth=depth, width=cfg["mlp_width"], **margs).to(device).eval()
            for r in norms(m, (x.to(device), y.to(device))):
                records.append({"family": "mlp", "model": label, "depth": depth, **r})
    g = torch.Generator().manual_seed(seed)
    xi = torch.randn(cfg["cnn_batch"], 3, 32, 32, generator=g)
    yi = torch.randint(0, 10, (cfg["cnn_batch"],), generator=g)
    for base in CNN_MODELS:
        for depth in cfg["init_cnn_depths"]:
            torch.manual_seed(seed)
            m = create_model(f"{base}{depth}", width=cfg["cnn_width"]).to(device).eval()
            with bn_statistics(m, "auto") as bn:  # fresh BatchNorms: the batch's statistics
                for r in norms(m, (xi.to(device), yi.to(device))):
                    records.append({"family": "cnn", "model": f"{base}{depth}", "depth": depth,
                                    **r, "bn": bn})
    return records


def _summarize_init(records: list[dict]) -> list[dict]:
    rows = []
    keys = sorted({(r["family"], r["model"], r["depth"]) for r in records},
                  key=lambda k: (k[0], k[1].rstrip("0123456789"), k[2]))
    for fam, model, depth in keys:
        rs = [r for r in records if (r["family"], r["model"], r["depth"]) == (fam, model, depth)]
        ratios = [r["ratio"] for r in rs]
        trans = [r["ratio"] for r in rs if r.get("transition")]
        rows.append({"family": fam, "model": model, "depth": depth, "blocks": len(rs),
                     "mean_abs_log_ratio": mean_abs_log(ratios),
                     "min_ratio": min(ratios), "max_ratio": max(ratios),
                     "transition_mean_abs_log_ratio": mean_abs_log(trans) if trans else None})
    return rows


def _mark_transitions(records: list[dict], model) -> None:
    flags = {f"blocks.{i}": bool(getattr(b, "transition", False)) for i, b in enumerate(model.blocks)}
    for r in records:
        r["transition"] = flags.get(r["block"], False)


def _train(out: Path, device: str, seed: int, progress: bool = False, **cfg) -> dict:
    from pnnh.train import train

    summary = train(dict(out=str(out), device=device, seed=seed, progress=progress, **cfg))
    return summary


def _tracked(run_dir: Path, transitions: set[str] | None = None) -> list[dict]:
    recs = read_jsonl(run_dir / "norms.jsonl")
    for r in recs:
        r["transition"] = bool(transitions and r["block"] in transitions)
    return recs


def _curve(recs: list[dict], only_transition: bool = False) -> list[tuple[int, float]]:
    steps = sorted({r["step"] for r in recs})
    out = []
    for s in steps:
        rs = [r["ratio"] for r in recs if r["step"] == s and (r["transition"] or not only_transition)]
        out.append((s, mean_abs_log(rs)))
    return out


def _late(curve: list[tuple[int, float]]) -> float:
    tail = [v for _, v in curve[len(curve) * 3 // 4:]]
    return sum(tail) / len(tail) if tail else float("nan")


def run(out: Path, scale: str = "cpu", device: str = "auto", seed: int = 0) -> dict:
    cfg = SCALES[scale]
    dev = "cuda" if device == "auto" and torch.cuda.is_available() else (
        "cpu" if device == "auto" else device)
    out = Path(out)

    # (a) at initialisation
    init = _init_ratios(cfg, seed, dev)
    for r in init:
        r["transition"] = False
    for base in CNN_MODELS:  # mark the CNNs' transition blocks
        for depth in cfg["init_cnn_depths"]:
            m = create_model(f"{base}{depth}", width=cfg["cnn_width"])
            _mark_transitions([r for r in init if r["model"] == f"{base}{depth}"], m)
    write_records(init, out, "init_ratios",
                  columns=["family", "model", "depth", "index", "block", "transition",
                           "grad_in_norm", "grad_out_norm", "ratio", "bn"])
    init_summary = _summarize_init(init)
    write_records(init_summary, out, "init_summary")

    # (a) during training
    train_rows, curves = [], {}
    for label, (name, margs) in MLP_MODELS.items():
        for depth in cfg["train_depths"]:
            run_dir = out / "runs" / f"{label}-{depth}"
            s = _train(run_dir, dev, seed, model=name, model_args=margs, dataset="mnist1d",
                       depth=depth,
                       width=cfg["mlp_width"], epochs=cfg["train_epochs"],
                       num_samples=cfg["num_samples"], track_norms=cfg["track_every"])
            c = _curve(_tracked(run_dir))
            curves[(label, depth)] = c
            train_rows.append({"model": label, "depth": depth, "final_val_acc": s["final_val_acc"],
                               "best_val_acc": s["best_val_acc"],
                               "first_mean_abs_log_ratio": c[0][1] if c else None,
                               "late_mean_abs_log_ratio": _late(c)})
    write_records(train_rows, out, "train_summary")
    write_records([{"model": m, "depth": d, "step": s, "mean_abs_log_ratio": v}
                   for (m, d), c in curves.items() for s, v in c], out, "train_curves")

    # (b) ResNet vs Procrustes ResNet
    p = cfg["proc"]
    proc_rows, proc_curves, proc_metrics = [], {}, {}
    data_dir = os.environ.get("PNNH_DATA_DIR", "data/cifar10") if p["dataset"] != "mnist1d" else None
    for label, opts in p["variants"].items():
        opts = dict(opts)
        model = opts.pop("model", p.get("model"))
        run_dir = out / "runs" / f"proc-{label}"
        extra = {k: p[k] for k in ("batch_size", "lr", "optimizer", "weight_decay") if k in p}
        kw = dict(model=model, dataset=p["dataset"], depth=p["depth"], epochs=p["epochs"],
                  track_norms=p["track_every"], model_args=opts, **extra)
        if "width" in p:
            kw["width"] = p["width"]
        if p["dataset"] == "mnist1d":
            kw["num_samples"] = cfg["num_samples"]
        else:
            kw["data_dir"] = data_dir
        s = _train(run_dir, dev, seed, **kw)
        built = create_model(model, **({"width": p["width"]} if "width" in p else {}),
                             **({"depth": p["depth"]} if p["dataset"] == "mnist1d" else {}),
                             **opts)
        transitions = {f"blocks.{i}" for i, b in enumerate(built.blocks)
                       if getattr(b, "transition", False)}
        recs = _tracked(run_dir, transitions)
        c_all, c_tr = _curve(recs), _curve(recs, only_transition=True)
        proc_curves[label] = (c_all, c_tr)
        proc_metrics[label] = read_jsonl(run_dir / "metrics.jsonl")
        proc_rows.append({"variant": label, "model": model, **opts,
                          "params": s.get("params"), "best_val_acc": s["best_val_acc"],
                          "final_val_acc": s["final_val_acc"],
                          "late_mean_abs_log_ratio": _late(c_all),
                          "late_transition_mean_abs_log_ratio": _late(c_tr),
                          "late_transition_ratio": _late_ratio(recs)})
    write_records(proc_rows, out, "procrustes_summary")

    _plot(out, init_summary, curves, proc_curves, proc_metrics)
    _print(init_summary, train_rows, proc_rows)
    return {"init": init_summary, "train": train_rows, "procrustes": proc_rows}


def _late_ratio(recs: list[dict]) -> float | None:
    steps = sorted({r["step"] for r in recs})
    late = set(steps[len(steps) * 3 // 4:])
    vals = [r["ratio"] for r in recs if r["transition"] and r["step"] in late and r["ratio"]]
    return sum(vals) / len(vals) if vals else None


def _fmt(v) -> str:
    return "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))


def _print(init_summary, train_rows, proc_rows) -> None:
    print("(a) mean |log ratio| per block at init (0 = norm-preserving)")
    for r in init_summary:
        print(f"  {r['family']:<4} {r['model']:<12} depth {r['depth']:>4}: "
              f"{_fmt(r['mean_abs_log_ratio'])}  [min {_fmt(r['min_ratio'])}, "
              f"max {_fmt(r['max_ratio'])}]  transitions {_fmt(r['transition_mean_abs_log_ratio'])}")
    print("(a) during training on MNIST-1D: mean |log ratio| first tracked step -> last quarter")
    for r in train_rows:
        print(f"  {r['model']:<12} depth {r['depth']:>4}: {_fmt(r['first_mean_abs_log_ratio'])} "
              f"-> {_fmt(r['late_mean_abs_log_ratio'])}  val acc {_fmt(r['final_val_acc'])}")
    print("(b) ResNet vs Procrustes ResNet")
    for r in proc_rows:
        print(f"  {r['variant']:<15} best val acc {_fmt(r['best_val_acc'])} final "
              f"{_fmt(r['final_val_acc'])}; late |log ratio| all {_fmt(r['late_mean_abs_log_ratio'])}"
              f", transitions {_fmt(r['late_transition_mean_abs_log_ratio'])} "
              f"(mean ratio {_fmt(r['late_transition_ratio'])})")


def _plot(out: Path, init_summary, curves, proc_curves, proc_metrics) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, fam in zip(axes, ("mlp", "cnn")):
        rows = [r for r in init_summary if r["family"] == fam]
        for base in sorted({r["model"].rstrip("0123456789") for r in rows}):
            rs = [r for r in rows if r["model"].rstrip("0123456789") == base]
            ax.plot([r["depth"] for r in rs], [r["mean_abs_log_ratio"] for r in rs], marker="o",
                    label=base)
        ax.set_xlabel("depth (weight layers)")
        ax.set_ylabel("mean |log(‖∂L/∂x_in‖/‖∂L/∂x_out‖)|")
        ax.set_title("MNIST-1D MLPs at init" if fam == "mlp" else "CIFAR CNNs (BatchNorm) at init")
        ax.legend()
    fig.tight_layout()
    save_figure(fig, out / "init_ratios.png", dpi=120)

    fig, ax = plt.subplots(figsize=(6.4, 4))
    for (m, d), c in curves.items():
        ax.plot([s for s, _ in c], [v for _, v in c], label=f"{m} depth {d}")
    ax.set_xlabel("training step")
    ax.set_ylabel("mean |log ratio| over blocks")
    ax.set_title("Norm preservation during training (MNIST-1D)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, out / "train_ratios.png", dpi=120)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for label, (c_all, c_tr) in proc_curves.items():
        axes[0].plot([s for s, _ in c_tr], [v for _, v in c_tr], label=f"{label} (transitions)")
        axes[0].plot([s for s, _ in c_all], [v for _, v in c_all], linestyle="--",
                     label=f"{label} (all blocks)")
        ms = proc_metrics[label]
        axes[1].plot([r["epoch"] for r in ms], [r["val_acc"] for r in ms], marker=".", label=label)
    axes[0].set_xlabel("training step")
    axes[0].set_ylabel("mean |log ratio|")
    axes[0].set_title("Gradient-norm ratio")
    axes[0].legend(fontsize=7)
    axes[1].set_xlabel("epoch")
    axes[1].set_ylabel("validation accuracy")
    axes[1].set_title("ResNet vs Procrustes ResNet")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, out / "procrustes.png", dpi=120)
