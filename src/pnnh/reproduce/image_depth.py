"""Experiment ``image-depth``: plain vs ResNet vs PNNH 2-D CNNs at depth on real images.

The papers' depth experiment (He et al.'s Fig. 6; PNNH's Table 1) on Fashion-MNIST (the IDX
files of Debian's ``dataset-fashion-mnist``, :func:`pnnh.data.get_dataset`), the registry's
CIFAR-layout nets (``plain{d}``, ``resnet{d}``, ``pnnh{d}``: 3 stages of 16/32/64 channels,
BatchNorm) at depths 20, 56 and 110 on ``(1, 28, 28)`` inputs. Two ablations answer *why*
PNNH trains as it does: the He-init ResNet against the zero-init one (``zero_init_residual``);
PNNH at its defaults (the learner's last BatchNorm at scale 1, a BatchNorm on each
transition's carried signal ``P x``) against the default before this study (scale 0, bare
``P``: ``pnnh_zero_init_decoder``) and against scale 1 with a bare ``P``
(``pnnh_bare_transitions``).

**The CPU protocol** (``--scale cpu``; fixed before any run, not tuned: it is the short
schedule of the first look on these files, and the test split is only ever reported): a fixed
10,000-image subset of the 60,000 training images (``num_samples``: the first 10,000 of a
seed-0 permutation), the whole 10,000-image test split, SGD with Nesterov momentum 0.9, peak
lr 0.05 after 0.3 epochs of linear warm-up then cosine to 0, weight decay 5e-4 (weights only),
batch 128, 3 epochs, no augmentation, channels-last. The plan (``CPU["plan"]``, in this
order, so that a study cut short keeps whole seeds: Ctrl-C, then the same command with fewer
entries reuses every finished run): plain, ResNet and PNNH at depths 20 and 56 over seeds 0, 1,
2 (the depth study proper, about an hour here); at depth 56, seed 0, the zero-init ResNet, PNNH
with the fixed ``P`` at its transitions and paper 2's Procrustes ResNet
(``procrustes_resnet56``: norm-preserving transitions, ZCA-whitened classifier input); ResNet,
PNNH and plain at depth 110, seed 0 (~8 minutes a run); the two remaining PNNH ablations at
56, seed 0. Each run records per-epoch training loss and error and test
accuracy (``runs/*/metrics.jsonl``) and, every 26 steps (3 times an epoch), the gradient-norm
ratio ``‖∂L/∂x_in‖ / ‖∂L/∂x_out‖`` of every block on the training batch
(``runs/*/norms.jsonl``: paper 2's measurement during training,
:class:`pnnh.probes.norms.NormTracker`).

``--scale paper``: all 60,000 training images, 40 epochs, lr 0.1, random crop (pad 3) + flip,
every depth at seeds 0-2, the ablations at 56 and the Procrustes ResNet at 110 (a GPU: data
resident on the device; ``--device cuda``).
``--scale quick``: depth 20, two steps per epoch on 384 of 512 images, scored on the other 128:
seconds, numbers meaningless.

Writes ``results.csv/json`` (one row per run), ``summary_table.csv/json`` (mean, min and max
over seeds per model and depth), ``curves.png`` (training loss and training error per epoch,
test accuracy against depth) and returns the table.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pnnh.io import atomic_write_json, read_jsonl, save_figure, write_records

DESCRIPTION = "plain vs ResNet vs PNNH CNNs at 20/56/110 layers on Fashion-MNIST (+ init ablation)"
CPU_MINUTES = 120  # the whole plan on the 2-core CPU (probes included); its first 18 runs ~1 h

# (label, model kind, model_args): the three families at their registry defaults, and the
# two ablations of the initialisation
VARIANTS = {
    "plain": ("plain", {}),
    "resnet": ("resnet", {}),
    "pnnh": ("pnnh", {}),
    "resnet_zero_init": ("resnet", {"zero_init_residual": True}),
    # the PNNH default before this study: learner's last BatchNorm at 0, a bare fixed P at
    # transitions
    "pnnh_zero_init_decoder": ("pnnh", {"zero_init_decoder": True, "transition_norm": False,
                                        "transition_coder": "orthogonal"}),
    # He-init learners (scale 1) with a bare fixed P at transitions: no BatchNorm on the carry
    "pnnh_bare_transitions": ("pnnh", {"transition_norm": False,
                                       "transition_coder": "orthogonal"}),
    # He-init learners, bn_c(P x) with the fixed co-isometry P (pair sums) instead of the
    # learned 1x1 projection: the default between the first and the second study
    "pnnh_orthogonal_transitions": ("pnnh", {"transition_coder": "orthogonal"}),
    "procrustes_resnet": ("procrustes_resnet", {}),
}
TRAIN = {"dataset": "fashion_mnist", "optimizer": "sgd", "momentum": 0.9, "lr": 0.05,
         "weight_decay": 5e-4, "schedule": "cosine", "warmup_epochs": 0.3, "batch_size": 128,
         "augment": False, "track_norms": 26}
# in this order, so that a study cut short has whole seeds: the three families at 20 and 56
# layers over three seeds, the ablations that ask why (seed 0), the 110-layer nets, and the two
# PNNH ablations of the defaults before this study
KINDS = ("plain", "resnet", "pnnh")
ABLATION = ("resnet_zero_init", "pnnh_zero_init_decoder", "pnnh_bare_transitions",
            "pnnh_orthogonal_transitions")
CPU = {"train": {**TRAIN, "epochs": 3, "num_samples": 10_000},
       # (depths, variants, seeds): what runs
       "plan": [((20, 56), KINDS, (0, 1, 2)),
                ((56,), ("resnet_zero_init", "pnnh_orthogonal_transitions", "procrustes_resnet"),
                 (0,)),
                ((110,), ("resnet", "pnnh", "plain"), (0,)),
                ((56,), ("pnnh_zero_init_decoder", "pnnh_bare_transitions"), (0,))]}
QUICK = {"train": {**TRAIN, "epochs": 2, "num_samples": 512, "max_steps_per_epoch": 2,
                   "dataset_args": {"holdout": 0.25}},
         "plan": [((20,), KINDS + ("pnnh_zero_init_decoder",), (0,))]}
PAPER = {"train": {**TRAIN, "epochs": 40, "lr": 0.1, "augment": True},
         "plan": [((20, 56, 110), KINDS, (0, 1, 2)), ((56,), ABLATION, (0, 1, 2)),
                  ((110,), ("procrustes_resnet",), (0, 1, 2))]}


def runs(plan: list) -> list[tuple[int, str, int]]:
    """``(depth, variant, seed)`` of every run in a plan, in the order they train."""
    return [(d, v, s) for depths, variants, seeds in plan for s in seeds for d in depths
            for v in variants]


def run(out: Path, scale: str = "cpu", device: str = "auto", seed: int = 0) -> dict:
    """Train every run of the scale's plan (finished runs in ``out/runs`` are reused).
    ``seed`` offsets every seed of the plan (``--seed 10`` runs seeds 10, 11, 12)."""
    out = Path(out)
    cfg = {"quick": QUICK, "cpu": CPU, "paper": PAPER}[scale]
    rows = []
    for depth, variant, s in runs(cfg["plan"]):
        kind, model_args = VARIANTS[variant]
        rows.append(train_and_probe(out, variant, depth, f"{kind}{depth}", model_args,
                                    seed + s, cfg["train"], device))
        write_records([{k: v for k, v in r.items() if not k.endswith("_curve")} for r in rows],
                      out, "results")
    return finish(out, rows)


def train_and_probe(out: Path, variant: str, depth: int, model: str, model_args: dict, seed: int,
                    train: dict, device: str) -> dict:
    """One run (``out/runs/{variant}{depth}_seed{seed}``, reused when finished) and its row:
    accuracy, final training loss and error, their curves, speed, and the probes at init and
    after training (:func:`norm_preservation`, :func:`input_kept`)."""
    from pnnh.train import train_or_reuse

    run_dir = out / "runs" / f"{variant}{depth}_seed{seed}"
    summary = train_or_reuse({**train, "model": model, "model_args": dict(model_args),
                              "out": str(run_dir), "device": device, "seed": seed,
                              "progress": False})
    hist = read_jsonl(run_dir / "metrics.jsonl")
    x, y = _probe_images(train, 512)  # the probes' images, and the run's initial weights: once
    init = _init_model(model, model_args, seed)
    row = {"variant": variant, "depth": depth, "seed": seed,
           **norm_preservation(init, x[:128], y[:128], run_dir),
           **input_kept(init, x, run_dir),
           "params": summary["params"], "test_acc": summary["final_val_acc"],
           "train_loss": summary["final_train_loss"],
           "train_error": 1.0 - summary["final_train_acc"],
           "train_loss_curve": [h["train_loss"] for h in hist],
           "train_error_curve": [1.0 - h["train_acc"] for h in hist],
           "images_per_s": hist[-1]["images_per_s"], "time_s": round(summary["time_s"], 1)}
    print(f"{variant:>24}{depth:<4} seed {seed}: test acc {row['test_acc']:.4f}  "
          f"train loss {row['train_loss']:.4f}  {row['time_s']:.0f} s", flush=True)
    return row


def finish(out: Path, rows: list[dict]) -> dict:
    """The study's files from its rows: ``summary_table``, ``results_curves.json``,
    ``curves.png``; prints and returns the tables."""
    stats = aggregate_rows(rows)
    write_records(stats, out, "summary_table")
    atomic_write_json(out / "results_curves.json", rows)
    plot(rows, stats, out / "curves.png")
    text = table(stats)
    print(text)
    print()
    print(norms_table(stats))
    print()
    print(dissipation_table(stats))
    return {"table": text, "norms_table": norms_table(stats),
            "dissipation_table": dissipation_table(stats), "stats": stats}


def _init_model(model: str, model_args: dict, seed: int):
    """The initial weights `pnnh train` draws from the run's seed."""
    from pnnh.models import create_model
    from pnnh.train import seed_everything

    seed_everything(seed)
    return create_model(model, in_shape=(1, 28, 28), num_classes=10, **model_args)


def _probe_images(train: dict, n: int):
    """The first ``n`` images (and labels) of the run's training set."""
    from pnnh.data import get_dataset

    train_set, _ = get_dataset(train["dataset"], num_samples=train.get("num_samples"),
                               **train.get("dataset_args", {}))
    return train_set.batch(torch.arange(min(n, len(train_set))))


def input_kept(init, x: torch.Tensor, run_dir: Path) -> dict:
    """Paper 1's dissipation on real images: how much of the input ``x`` (512 training images)
    the last block still holds, at initialisation (the run's initial weights ``init``, BatchNorm
    with the statistics of ``x``, held fixed) and after training (the final checkpoint, running
    statistics) —
    ``input_r2`` (ridge read-back of the input; 1: all there, 0: nothing) and
    ``cosine_collapse`` (mean cosine between the images' representations; 1: one direction)
    of :func:`pnnh.probes.dissipation.dissipation`."""
    from pnnh.checkpoint import load_model
    from pnnh.probes.common import bn_statistics
    from pnnh.probes.dissipation import dissipation

    def last(model) -> dict:
        rec = dissipation(model, x, [f"blocks.{len(model.blocks) - 1}"], batch_size=256)[-1]
        return {"r2": rec["input_r2"], "cos": rec["cosine_collapse"]}

    with bn_statistics(init, "batch", fixed_on=x):
        at_init = last(init)
    path = run_dir / "checkpoints" / "last.pt"
    trained = last(load_model(path)[0]) if path.is_file() else {"r2": float("nan"),
                                                                 "cos": float("nan")}
    return {"input_r2_init": at_init["r2"], "input_r2_trained": trained["r2"],
            "cosine_init": at_init["cos"], "cosine_trained": trained["cos"]}


def norm_preservation(init, x: torch.Tensor, y: torch.Tensor, run_dir: Path) -> dict:
    """Paper 2's measure, mean ``|log(‖∂L/∂x_in‖ / ‖∂L/∂x_out‖)|`` over blocks (0: every block
    preserves the gradient norm), for the non-transition blocks and the transitions apart: at
    initialisation (the run's initial weights ``init``, on the 128 training images ``x, y``
    with batch statistics, as on its first step) and at its last tracked step
    (``norms.jsonl``, the training batch of that step)."""
    import math

    from pnnh.probes.common import bn_statistics
    from pnnh.probes.norms import norms

    def split(records: list[dict]) -> tuple[float, float]:
        logs = {r["block"]: abs(math.log(r["ratio"])) for r in records if r["ratio"] > 0}
        inner = [v for b, v in logs.items() if b not in trans]
        edge = [v for b, v in logs.items() if b in trans]
        nan = float("nan")  # a model without transition blocks (a ViT) has no transition mean
        return (sum(inner) / len(inner) if inner else nan, sum(edge) / len(edge) if edge else nan)

    trans = {f"blocks.{i}" for i, b in enumerate(init.blocks) if getattr(b, "transition", False)}
    with bn_statistics(init.eval(), "batch"):
        at_init = split(norms(init, (x, y)))
    tracked = read_jsonl(run_dir / "norms.jsonl")
    final = max((t["step"] for t in tracked), default=None)
    last = [r for r in tracked if r["step"] == final]
    trained = split(last) if last else (float("nan"), float("nan"))
    return {"norm_log_init": at_init[0], "norm_log_init_transitions": at_init[1],
            "norm_log_trained": trained[0], "norm_log_trained_transitions": trained[1]}


def aggregate_rows(rows: list[dict]) -> list[dict]:
    """Mean, min and max of test accuracy and final training loss over seeds, per variant and
    depth, in the order first met."""
    keys = list(dict.fromkeys((r["variant"], r["depth"]) for r in rows))
    out = []
    for variant, depth in keys:
        mine = [r for r in rows if (r["variant"], r["depth"]) == (variant, depth)]
        acc = [r["test_acc"] for r in mine]
        loss = [r["train_loss"] for r in mine]
        out.append({"variant": variant, "depth": depth, "seeds": len(mine),
                    "params": mine[0]["params"], "test_acc_mean": sum(acc) / len(acc),
                    "test_acc_min": min(acc), "test_acc_max": max(acc),
                    "train_loss_mean": sum(loss) / len(loss), "train_loss_min": min(loss),
                    "train_loss_max": max(loss),
                    # rows read back from JSON hold null where a measure has no value (NaN)
                    **{k: sum(float("nan") if r[k] is None else r[k] for r in mine) / len(mine)
                       for k in (
                        "norm_log_init", "norm_log_init_transitions", "norm_log_trained",
                        "norm_log_trained_transitions", "input_r2_init", "input_r2_trained",
                        "cosine_init", "cosine_trained")},
                    "minutes_per_run": sum(r["time_s"] for r in mine) / len(mine) / 60})
    return out


def table(stats: list[dict]) -> str:
    """The markdown table of ``summary_table.csv`` (as docs/REPRODUCTION.md shows it)."""
    lines = ["| model | depth | seeds | params | test acc mean [min, max] | final train loss "
             "mean [min, max] | min/run |", "|---|---|---|---|---|---|---|"]
    for s in stats:
        lines.append(
            f"| {s['variant']} | {s['depth']} | {s['seeds']} | {s['params']:,} | "
            f"{s['test_acc_mean']:.4f} [{s['test_acc_min']:.4f}, {s['test_acc_max']:.4f}] | "
            f"{s['train_loss_mean']:.3f} [{s['train_loss_min']:.3f}, {s['train_loss_max']:.3f}]"
            f" | {s['minutes_per_run']:.1f} |")
    return "\n".join(lines)


def _pairs_table(stats: list[dict], header: str, columns: list[tuple[str, str]]) -> str:
    """One row per model and depth; each column ``a / b`` of two of its statistics (``—``
    where a statistic has no value, e.g. the transitions of a net that has none)."""
    def f(v: float) -> str:
        return "—" if v != v else f"{v:.3f}"

    lines = [header, "|---|---|" + "---|" * len(columns)]
    for s in stats:
        cells = " | ".join(f"{f(s[a])} / {f(s[b])}" for a, b in columns)
        lines.append(f"| {s['variant']} | {s['depth']} | {cells} |")
    return "\n".join(lines)


def norms_table(stats: list[dict]) -> str:
    """Paper 2's measure per model and depth (means over seeds), blocks and transitions apart."""
    return _pairs_table(
        stats, "| model | depth | mean abs log ratio, init: blocks / transitions | after "
               "training: blocks / transitions |",
        [("norm_log_init", "norm_log_init_transitions"),
         ("norm_log_trained", "norm_log_trained_transitions")])


def dissipation_table(stats: list[dict]) -> str:
    """Paper 1's dissipation at the last block per model and depth (means over seeds)."""
    return _pairs_table(
        stats, "| model | depth | input R² at the last block: init / trained | mean cosine "
               "between images: init / trained |",
        [("input_r2_init", "input_r2_trained"), ("cosine_init", "cosine_trained")])


# the ResNets drawn wide, so that a PNNH net that trains as the ResNet does (its default on
# BatchNorm CNNs, weight for weight) shows as a thin line inside a wide one, not as one line
_WIDTH = {"resnet": 4.0, "vit": 4.0}


def plot(rows: list[dict], stats: list[dict], path: Path) -> Path:
    """Training loss and training error per epoch (seed 0 of each run, one line per model and
    depth, deeper dashed), and test accuracy against depth (mean, min-max bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    colours = {"plain": "tab:red", "resnet": "tab:blue", "pnnh": "tab:green",
               "resnet_zero_init": "tab:cyan", "pnnh_zero_init_decoder": "tab:olive",
               "pnnh_bare_transitions": "tab:brown", "pnnh_orthogonal_transitions": "tab:pink",
               "procrustes_resnet": "tab:purple", "vit": "tab:blue", "pnnh_vit": "tab:green",
               "plain_vit": "tab:red"}
    depths = sorted({r["depth"] for r in rows})
    styles = dict(zip(depths, ["-", "--", ":", "-."]))
    first = min(r["seed"] for r in rows)
    for r in rows:
        if r["seed"] != first:
            continue
        epochs = range(1, len(r["train_loss_curve"]) + 1)
        label = f"{r['variant']}-{r['depth']}"
        kw = {"color": colours.get(r["variant"]), "linestyle": styles[r["depth"]], "label": label,
              "linewidth": _WIDTH.get(r["variant"], 1.5)}
        axes[0].plot(epochs, r["train_loss_curve"], **kw)
        axes[1].plot(epochs, r["train_error_curve"], **kw)
    for ax, name in zip(axes[:2], ("training loss", "training error")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.set_yscale("log")
        ax.set_title(f"{name} (seed {first})")
    axes[0].legend(fontsize=7, ncol=2)
    for variant in dict.fromkeys(s["variant"] for s in stats):
        pts = sorted((s["depth"], s["test_acc_mean"], s["test_acc_min"], s["test_acc_max"])
                     for s in stats if s["variant"] == variant)
        axes[2].errorbar([p[0] for p in pts], [p[1] for p in pts],
                         yerr=[[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]],
                         marker="o", capsize=3, color=colours.get(variant), label=variant,
                         linewidth=_WIDTH.get(variant, 1.5), markersize=2 + _WIDTH.get(variant, 1.5) * 2)
    axes[2].set_xlabel("depth (weight layers)")
    axes[2].set_ylabel("test accuracy (mean, min-max over seeds)")
    axes[2].set_title("Fashion-MNIST test accuracy")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)
