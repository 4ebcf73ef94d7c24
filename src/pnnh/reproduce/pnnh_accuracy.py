"""Experiment ``pnnh-accuracy``: plain vs ResNet vs PNNH at increasing depth, same training.

``--scale cpu`` (the default): MNIST-1D (the package's default 10,000 samples: 8,000 train /
2,000 test), an MLP (width 128) and a 1-D CNN (16 channels) at 8, 32 and 100 weight layers,
each as a plain net, a ResNet and a PNNH net, all trained with AdamW (lr 1e-3, cosine
schedule, batch 128) for the same number of epochs. Then, on the 100-layer MLP, the ways of
keeping the coder orthogonal (none / exact Procrustes SVD / penalty / the default batched
Newton–Schulz step, every step or every 4th), a parameter-matched PNNH (learner width 64)
and a coder ratio r = 0.5. Finally the depth-8 runs are repeated with two more seeds, to show
the seed-to-seed spread the table should be read with. Writes
``results.csv/json`` (one row per run: accuracy and parameters), ``ablation.csv/json``,
``seeds.csv/json`` and
``accuracy_vs_depth.png``; every run's directory (metrics, checkpoints) is under ``runs/``,
and a finished run is reused when the experiment is run again.

``--scale quick``: the CPU study at test size (one MLP family at depth 8, width 8, one epoch
of two steps on 200 samples, a two-variant ablation, one extra seed): seconds.

``--scale paper``: CIFAR-10 and CIFAR-100 (python-pickle batches under
``$PNNH_DATA_DIR/cifar10`` and ``$PNNH_DATA_DIR/cifar100``, ``PNNH_DATA_DIR`` default
``data``), plain/ResNet/PNNH at 20, 56 and 110 layers; SGD (lr 0.1, momentum 0.9,
Nesterov), weight decay 5e-4, cosine schedule, 200 epochs, batch 128, random crop + flip —
the usual CIFAR ResNet recipe. Hours on a GPU; not run in tests.
"""

from __future__ import annotations

import os
from pathlib import Path

from pnnh.io import atomic_write_json, read_jsonl, save_figure, write_records

DESCRIPTION = "plain vs ResNet vs PNNH on MNIST-1D (MLP, 1-D CNN; 8/32/100 layers) + coder ablation"
CPU_MINUTES = 18

KINDS = ("plain", "resnet", "pnnh")
# The ResNets start with a zero last layer in each residual branch (zero_init_residual, Goyal
# et al. 2017), the same treatment as PNNH's zero-init learner decoder: with He init on both
# layers the post-activation residual MLP's activations grow with depth and it diverges.
MODEL_ARGS = {"plain": {}, "resnet": {"zero_init_residual": True}, "pnnh": {}}
SUFFIX = {"plain": "", "resnet": "_zero_init", "pnnh": ""}
CPU = {
    "dataset": "mnist1d",
    "families": {"mlp": {"width": 128}, "cnn1d": {"width": 16}},
    "depths": (8, 32, 100),
    "train": {"epochs": 10, "batch_size": 128, "lr": 1e-3, "optimizer": "adamw",
              "schedule": "cosine"},
    # seed-to-seed spread, measured where runs are cheap (depth 8), to read the table by
    "extra_seeds": {"depth": 8, "seeds": (1, 2)},
    "ablation": {
        "model": "pnnh_mlp", "depth": 100, "width": 128,
        "variants": {
            "fixed (default)": {},
            "newton_schulz": {"coder_constraint": "newton_schulz"},
            "none": {"coder_constraint": "none"},
            "procrustes (SVD)": {"coder_constraint": "procrustes"},
            "penalty": {"coder_constraint": "penalty"},
            "learner_width=64": {"learner_width": 64},
            "project_every=4": {"project_every": 4},
            "coder_ratio=0.5": {"coder_ratio": 0.5},
        },
    },
}
# test-sized (seconds; ``PNNH_QUICK=1``, the docs-commands test): every part of the CPU study
QUICK = {**CPU, "families": {"mlp": {"width": 8}}, "depths": (8,),
         "train": {**CPU["train"], "epochs": 1, "max_steps_per_epoch": 2, "num_samples": 200},
         "extra_seeds": {"depth": 8, "seeds": (1,)},
         "ablation": {"model": "pnnh_mlp", "depth": 8, "width": 8,
                      "variants": {"fixed (default)": {}, "none": {"coder_constraint": "none"}}}}
PAPER = {
    "datasets": ("cifar10", "cifar100"),
    "depths": (20, 56, 110),
    "train": {"epochs": 200, "batch_size": 128, "lr": 0.1, "optimizer": "sgd", "momentum": 0.9,
              "weight_decay": 5e-4, "schedule": "cosine", "augment": True},
}


def _name(family: str, kind: str) -> str:
    return f"{kind}_{family}"


def _run(run_dir: Path, config: dict, device: str, seed: int) -> dict:
    """Train one configuration, or reuse its finished run (:func:`pnnh.train.train_or_reuse`)."""
    from pnnh.train import train_or_reuse

    return train_or_reuse({**config, "out": str(run_dir), "device": device, "seed": seed,
                           "progress": False})


def _row(summary: dict, **extra) -> dict:
    return {**extra, "params": summary["params"],
            "final_test_acc": summary["final_val_acc"], "best_test_acc": summary["best_val_acc"],
            "final_train_loss": summary["final_train_loss"],
            "time_s": round(summary["time_s"], 1)}


def _plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = lambda r: r.get("dataset") or r["family"]  # noqa: E731
    groups = sorted({key(r) for r in rows})
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4), squeeze=False)
    for ax, fam in zip(axes[0], groups):
        for kind in KINDS:
            pts = sorted((r["depth"], r["final_test_acc"]) for r in rows
                         if key(r) == fam and r["kind"] == kind)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=kind)
        ax.set_xscale("log")
        ax.set_xlabel("depth (weight layers)")
        ax.set_ylabel("test accuracy (final epoch)")
        ax.set_title(f"{title}: {fam}")
        ax.legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


def table(rows: list[dict]) -> str:
    """The markdown table of ``results.csv`` (as it appears in docs/PNNH.md)."""
    lines = ["| family | depth | plain | ResNet | PNNH | PNNH - ResNet | params plain / ResNet / "
             "PNNH |", "|---|---|---|---|---|---|---|"]
    keys = sorted({(r.get("dataset", ""), r["family"], r["depth"]) for r in rows})
    for ds, fam, depth in keys:
        by = {r["kind"]: r for r in rows
              if (r.get("dataset", ""), r["family"], r["depth"]) == (ds, fam, depth)}
        acc = [by[k]["final_test_acc"] if k in by else float("nan") for k in KINDS]
        par = " / ".join(f"{by[k]['params']:,}" if k in by else "-" for k in KINDS)
        label = f"{ds} {fam}".strip()
        lines.append(f"| {label} | {depth} | {acc[0]:.3f} | {acc[1]:.3f} | {acc[2]:.3f} | "
                     f"{acc[2] - acc[1]:+.3f} | {par} |")
    return "\n".join(lines)


def run(out: Path, scale: str = "cpu", device: str = "auto", seed: int = 0) -> dict:
    out = Path(out)
    if scale == "paper":
        return _run_paper(out, device, seed)
    return _run_cpu(out, device, seed, QUICK if scale == "quick" else CPU)


def _run_cpu(out: Path, device: str, seed: int, cfg: dict) -> dict:
    rows = []
    for family, fam_args in cfg["families"].items():
        for depth in cfg["depths"]:
            for kind in KINDS:
                model = _name(family, kind)
                run_cfg = {"model": model, "dataset": cfg["dataset"], "depth": depth,
                           "width": fam_args["width"], "model_args": dict(MODEL_ARGS[kind]),
                           **cfg["train"]}
                s = _run(out / "runs" / f"{model}{SUFFIX[kind]}_d{depth}", run_cfg, device, seed)
                rows.append(_row(s, family=family, depth=depth, kind=kind, model=model))
                write_records(rows, out, "results")
    _plot(rows, out / "accuracy_vs_depth.png", "MNIST-1D")

    ab = cfg["ablation"]
    ablation = []
    for label, model_args in ab["variants"].items():
        run_cfg = {"model": ab["model"], "dataset": cfg["dataset"], "depth": ab["depth"],
                   "width": ab["width"], "model_args": model_args, **cfg["train"]}
        slug = f"ablation_{label.split(' ')[0].replace('=', '')}"
        if not model_args and ab["depth"] in cfg["depths"]:  # the main study's PNNH run
            slug = f"{ab['model']}_d{ab['depth']}"
        s = _run(out / "runs" / slug, run_cfg, device, seed)
        ablation.append(_row(s, variant=label, model=ab["model"], depth=ab["depth"]))
        write_records(ablation, out, "ablation")

    spread = []
    es = cfg["extra_seeds"]
    for family, fam_args in cfg["families"].items():
        for kind in KINDS:
            model = _name(family, kind)
            run_cfg = {"model": model, "dataset": cfg["dataset"], "depth": es["depth"],
                       "width": fam_args["width"], "model_args": dict(MODEL_ARGS[kind]),
                       **cfg["train"]}
            accs = [r["final_test_acc"] for r in rows
                    if (r["family"], r["kind"], r["depth"]) == (family, kind, es["depth"])]
            for sd in es["seeds"]:
                run_dir = out / "runs" / f"{model}{SUFFIX[kind]}_d{es['depth']}_seed{sd}"
                accs.append(_run(run_dir, run_cfg, device, sd)["final_val_acc"])
            spread.append({"family": family, "kind": kind, "depth": es["depth"],
                           "seeds": [seed, *es["seeds"]], "final_test_acc": accs,
                           "mean": sum(accs) / len(accs), "min": min(accs), "max": max(accs)})
            write_records(spread, out, "seeds")

    gaps = {f"{r['family']}_d{r['depth']}": None for r in rows}
    for key in gaps:
        by = {r["kind"]: r["final_test_acc"] for r in rows if f"{r['family']}_d{r['depth']}" == key}
        gaps[key] = by["pnnh"] - by["resnet"]
    summary = {"rows": rows, "ablation": ablation, "seeds": spread, "pnnh_minus_resnet": gaps,
               "pnnh_within_1pt_of_resnet": all(g >= -0.01 for g in gaps.values()),
               "table": table(rows)}
    atomic_write_json(out / "results_summary.json", summary)
    print(table(rows))
    print()
    for r in ablation:
        print(f"{r['variant']:<26} acc {r['final_test_acc']:.3f}  params {r['params']:,}  "
              f"time {r['time_s']:.0f}s")
    print()
    for r in spread:
        accs = ", ".join(f"{a:.3f}" for a in r["final_test_acc"])
        print(f"seeds {r['seeds']}: {r['family']:<6} d{r['depth']} {r['kind']:<7} {accs}  "
              f"mean {r['mean']:.3f}")
    return summary


def _run_paper(out: Path, device: str, seed: int) -> dict:
    rows = []
    for ds in PAPER["datasets"]:
        data_dir = os.path.join(os.environ.get("PNNH_DATA_DIR", "data"), ds)
        for depth in PAPER["depths"]:
            for kind in KINDS:
                model = f"{kind}{depth}"
                cfg = {"model": model, "dataset": ds, "data_dir": data_dir,
                       "model_args": dict(MODEL_ARGS[kind]), **PAPER["train"]}
                s = _run(out / "runs" / f"{ds}_{model}{SUFFIX[kind]}", cfg, device, seed)
                rows.append(_row(s, dataset=ds, family="cifar", depth=depth, kind=kind,
                                 model=model))
                write_records(rows, out, "results")
    _plot(rows, out / "accuracy_vs_depth.png", "CIFAR")
    print(table(rows))
    return {"rows": rows, "table": table(rows)}


def metrics(run_dir: Path) -> list[dict]:
    """Per-epoch metrics of one run (for plots and reports)."""
    return read_jsonl(Path(run_dir) / "metrics.jsonl")
