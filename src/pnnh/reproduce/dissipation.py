"""Paper 1, "dissipating inputs": plain MLPs lose the input with depth, residual / PNNH keep it.

For every kind (plain, ResNet, PNNH) and depth, on MNIST-1D:

1. **At initialisation**, probe the model on a fixed validation batch
   (:func:`pnnh.probes.dissipation.dissipation`: surviving fraction, input R², cosine
   collapse, effective rank after every block) and draw the mean-field theory curve of the
   same kind (:mod:`pnnh.probes.theory`, started from the batch's mean input cosine).
2. **Train** it briefly (AdamW, the shared trainer), then probe the trained model again.

Files: ``dissipation.csv/.json`` (every block of every model, ``phase`` init/trained),
``theory.csv/.json``, ``accuracy.csv/.json`` (a row per model: final/best validation accuracy,
parameters, input R² at the last block at init and after training), ``dissipation.png``
(input R² at the last block vs depth, input R² vs layer depth for the deepest models, cosine
vs depth beside theory, and the accuracy table), and ``runs/`` (the training runs).

The kinds: ``plain`` = ``plain_mlp``; ``resnet`` = ``resnet_mlp`` (He initialisation, no
scaling: its branches dominate the identity path at init, see ``docs/PROBES.md``);
``resnet0`` = ``resnet_mlp`` with zero-initialised residual branches (the identity at init);
``pnnh`` = ``pnnh_mlp`` with its defaults (orthogonal coder, zero-initialised learner decoder,
the Newton-Schulz projection of the coder after each optimizer step).

A training run that fails (diverges, or a numerical error) is recorded in ``accuracy.csv``
(``error``, accuracy empty) and the experiment goes on; its trained-phase probe is skipped.
"""

from __future__ import annotations

import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from pnnh.errors import PnnhError  # noqa: E402
from pnnh.io import save_figure, write_records  # noqa: E402
from pnnh.probes import theory  # noqa: E402
from pnnh.probes.dissipation import dissipation  # noqa: E402

DESCRIPTION = ("paper 1: input R2 / cosine collapse / surviving units vs depth for plain, "
               "ResNet and PNNH MLPs, at init (with theory) and after training")
CPU_MINUTES = 10

KINDS = {  # kind -> (registered model, model_args, theory kind, theory options)
    "plain": ("plain_mlp", {}, "plain", {}),
    "resnet": ("resnet_mlp", {}, "resnet", {"alpha": 1.0}),
    "resnet0": ("resnet_mlp", {"zero_init_residual": True}, "resnet", {"alpha": 0.0}),
    "pnnh": ("pnnh_mlp", {}, "pnnh", {"learner_scale": 0.0}),
}

SCALES = {
    # test-sized: seconds, every kind and code path (``PNNH_QUICK=1``, the docs-commands test)
    "quick": {"depths": [4, 6], "width": 16, "epochs": 1, "num_samples": 1000,
              "probe_samples": 64, "batch_size": 128, "lr": 1e-3},
    "cpu": {"depths": [8, 34, 102, 202], "width": 128, "epochs": 5, "num_samples": 5000,
            "probe_samples": 512, "batch_size": 128, "lr": 1e-3},
    "paper": {"depths": [8, 34, 102, 202, 402], "width": 128, "epochs": 15,
              "num_samples": 10000, "probe_samples": 1000, "batch_size": 128, "lr": 1e-3},
}


def _probe_batch(num_samples: int, probe_samples: int, seed: int) -> torch.Tensor:
    from pnnh.data import get_dataset

    _, val = get_dataset("mnist1d", num_samples=num_samples, seed=seed)
    idx = torch.randperm(len(val), generator=torch.Generator().manual_seed(seed))[:probe_samples]
    return torch.stack([val[i][0] for i in idx.tolist()])


def _mean_input_cosine(x: torch.Tensor) -> float:
    u = x.reshape(x.shape[0], -1).double()
    u = u / u.norm(dim=1, keepdim=True)
    n = u.shape[0]
    return float(((u.sum(0) @ u.sum(0)) - n) / (n * (n - 1)))


def run(out: Path, scale: str = "cpu", device: str = "auto", seed: int = 0,
        kinds: tuple[str, ...] = tuple(KINDS), depths: list[int] | None = None,
        epochs: int | None = None, **scale_overrides) -> dict:
    """Run the experiment at ``scale`` (:data:`SCALES`); ``kinds``, ``depths``, ``epochs`` and
    ``scale_overrides`` (keys of a scale: ``width``, ``num_samples``, ...) narrow it down."""
    from pnnh.checkpoint import load_model
    from pnnh.models import count_parameters, create_model
    from pnnh.train import pick_device, train

    unknown = set(scale_overrides) - set(SCALES[scale])
    if unknown:
        raise ValueError(f"unknown scale option(s) {sorted(unknown)}; known: {sorted(SCALES[scale])}")
    cfg = {**SCALES[scale], **scale_overrides}
    depths = list(depths or cfg["depths"])
    epochs = int(epochs or cfg["epochs"])
    out = Path(out)
    dev = pick_device(device)
    x = _probe_batch(cfg["num_samples"], cfg["probe_samples"], seed).to(dev)
    rho0 = _mean_input_cosine(x)
    records, theory_records, accuracy = [], [], []
    t0 = time.time()
    for kind in kinds:
        name, model_args, theory_kind, theory_opts = KINDS[kind]
        for depth in depths:
            torch.manual_seed(seed)
            model = create_model(name, in_shape=tuple(x.shape[1:]), num_classes=10, depth=depth,
                                 width=cfg["width"], **model_args).to(dev)
            init = dissipation(model, x, seed=seed)
            run_dir = out / "runs" / f"{kind}-{depth}"
            nan, error = float("nan"), ""
            try:
                summary = train({
                    "model": name, "dataset": "mnist1d", "depth": depth, "width": cfg["width"],
                    "model_args": model_args, "epochs": epochs, "batch_size": cfg["batch_size"],
                    "lr": cfg["lr"], "optimizer": "adamw", "schedule": "cosine", "seed": seed,
                    "device": str(dev), "num_samples": cfg["num_samples"], "out": str(run_dir),
                    "progress": False,
                })
                trained_model, _ = load_model(run_dir / "checkpoints" / "last.pt",
                                              map_location=dev)
                trained = dissipation(trained_model.to(dev), x, seed=seed)
            except (PnnhError, RuntimeError) as e:  # a diverged / failed run is a result too
                error = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                summary, trained = {"final_val_acc": nan, "best_val_acc": nan}, []
            for phase, recs in (("init", init), ("trained", trained)):
                records += [{"kind": kind, "model_depth": depth, "phase": phase, **r} for r in recs]
            r2_trained = trained[-1]["input_r2"] if trained else nan
            accuracy.append({
                "kind": kind, "depth": depth, "params": count_parameters(model),
                "final_val_acc": summary["final_val_acc"], "best_val_acc": summary["best_val_acc"],
                "input_r2_init": init[-1]["input_r2"], "input_r2_trained": r2_trained,
                "cosine_init": init[-1]["cosine_collapse"],
                "cosine_trained": trained[-1]["cosine_collapse"] if trained else nan,
                "error": error,
            })
            print(f"[dissipation] {kind}-{depth}: val acc {summary['final_val_acc']:.3f}, "
                  f"input R2 at the last block {init[-1]['input_r2']:.3f} (init) -> "
                  f"{r2_trained:.3f} (trained)  [{time.time() - t0:.0f}s]"
                  + (f"  FAILED: {error}" if error else ""), flush=True)
        deepest = max(depths)
        opts = {"particles": 100_000, "seed": seed} if theory_kind in ("resnet", "pnnh") else {}
        for r in theory.curves(theory_kind, deepest, rho0, **opts, **theory_opts):
            theory_records.append({"kind": kind, **r})

    write_records(records, out, "dissipation")
    write_records(theory_records, out, "theory")
    write_records(accuracy, out, "accuracy")
    plot(records, theory_records, accuracy, out / "dissipation.png")
    return {
        "depths": depths, "epochs": epochs, "width": cfg["width"], "input_cosine": rho0,
        "seconds": round(time.time() - t0, 1),
        "accuracy": {f"{a['kind']}-{a['depth']}": a["final_val_acc"] for a in accuracy},
        "failed": {f"{a['kind']}-{a['depth']}": a["error"] for a in accuracy if a["error"]},
        "input_r2_last_block": {
            f"{a['kind']}-{a['depth']}": {"init": a["input_r2_init"],
                                          "trained": a["input_r2_trained"]} for a in accuracy
        },
    }


def plot(records: list[dict], theory_records: list[dict], accuracy: list[dict], path: Path) -> Path:
    """Input R² at the last block vs depth; R² and cosine per layer of the deepest models with
    theory; the table of accuracies."""

    kinds = list(dict.fromkeys(a["kind"] for a in accuracy))
    colors = {k: f"C{i}" for i, k in enumerate(kinds)}
    deepest = max(a["depth"] for a in accuracy)
    fig, axes = plt.subplots(1, 4, figsize=(21, 4.6), gridspec_kw={"width_ratios": [1, 1, 1, 1.1]})
    ax = axes[0]
    for kind in kinds:
        rows = sorted((a for a in accuracy if a["kind"] == kind), key=lambda a: a["depth"])
        d = [a["depth"] for a in rows]
        ax.plot(d, [a["input_r2_init"] for a in rows], "--o", color=colors[kind],
                label=f"{kind} (init)")
        ax.plot(d, [a["input_r2_trained"] for a in rows], "-s", color=colors[kind],
                label=f"{kind} (trained)")
    ax.set_xscale("log")
    ax.set_xlabel("depth (weight layers)")
    ax.set_ylabel("input R² at the last block")
    ax.set_title("input read-back vs depth")
    ax.legend(fontsize=7)
    for ax, metric, title in ((axes[1], "input_r2", "input R²"),
                              (axes[2], "cosine_collapse", "cosine collapse")):
        for kind in kinds:
            for phase, style in (("init", "--"), ("trained", "-")):
                rs = [r for r in records if r["kind"] == kind and r["model_depth"] == deepest
                      and r["phase"] == phase]
                ax.plot([r["depth"] for r in rs], [r[metric] for r in rs], style,
                        color=colors[kind], label=f"{kind} ({phase})")
            if metric == "cosine_collapse":
                ts = [t for t in theory_records if t["kind"] == kind]
                ax.plot([t["depth"] for t in ts], [t["correlation"] for t in ts], ":",
                        color=colors[kind], linewidth=2, label=f"{kind} (theory, init)")
        ax.set_xlabel("layer depth (weight layers)")
        ax.set_ylabel(title)
        ax.set_title(f"{title} per block, {deepest}-layer models")
        ax.legend(fontsize=7)
    ax = axes[3]
    ax.axis("off")
    cells = [[a["kind"], str(a["depth"]), f"{a['params']:,}", f"{a['final_val_acc']:.3f}",
              f"{a['input_r2_init']:.2f}", f"{a['input_r2_trained']:.2f}"] for a in accuracy]
    table = ax.table(cellText=cells, colLabels=["kind", "depth", "params", "val acc",
                                                "R² init", "R² trained"], loc="center")
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    table.scale(1, 1.3)
    ax.set_title("final validation accuracy (MNIST-1D)")
    for a in axes[:3]:
        a.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path, dpi=100)
