"""Experiment ``deep-plain``: a 1000-layer PNNH MLP that trains, exported to a plain stack.

A PNNH MLP of depth ``L`` is a stem, ``(L - 2) / 2`` PNNH blocks and a head. Each block,
``y = relu(AᵀA x + D relu(E x + b1) + b2)`` with ``AᵀA = I``, is two plain layers
``[A; -A; E]`` and ``[Aᵀ, -Aᵀ, D]`` (``relu(Ax) - relu(-Ax) = Ax``), so the trained net is
*exactly* an ``L``-layer ``nn.Sequential`` of ``Linear`` and ``ReLU`` modules, with no
addition of an earlier tensor anywhere.

``--scale cpu`` (and ``paper``, the same runs on ``--device``): MNIST-1D (the default 10,000
samples, 8,000 train / 2,000 test), PNNH MLPs of width ``CPU["width"]`` at depths 100 and 1000,
trained alike: AdamW (lr 1e-3, cosine schedule after one epoch of linear warm-up, gradient
norm clipped at 1), batch 128, 15 epochs. Without the warm-up the 1000-layer net's first Adam
steps (every decoder weight moves by about lr at once, in all 500 blocks) blow the activations
up (a trial at 20 steps per epoch, with the then-default trainable coder: train loss 18.6 in
the first epoch, then chance). The
target: the 1000-layer net within 1 point of the 100-layer one. The trained 1000-layer net
(last epoch) is then exported with :func:`pnnh.to_plain`; the export must give the model's
outputs on the test set (``allclose`` in float64, atol = rtol = 1e-5; the largest float64
and float32 differences are recorded) and :func:`pnnh.plainness.find_skips` must find no skip in it.

Writes ``results.csv/json`` (one row per depth: parameters, final and best test accuracy,
time), ``curves.csv/json`` (per epoch: train loss, test accuracy), ``export.json`` (layer
count, output difference, skips) and ``training_curves.png``; each run's directory is under
``runs/`` and a finished run is reused when the experiment is run again.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from pnnh.io import atomic_write_json, read_jsonl, save_figure, write_records

DESCRIPTION = "1000-layer PNNH MLP on MNIST-1D vs 100 layers, exported to a plain nn.Sequential"
CPU_MINUTES = 33

CPU = {
    "model": "pnnh_mlp", "dataset": "mnist1d", "width": 64, "depths": (100, 1000),
    "train": {"epochs": 15, "batch_size": 128, "lr": 1e-3, "optimizer": "adamw",
              "schedule": "cosine", "warmup_epochs": 1.0, "grad_clip": 1.0},
    "atol": 1e-5,
}
# the same experiment at a size the test suite can afford
QUICK = {
    "model": "pnnh_mlp", "dataset": "mnist1d", "width": 8, "depths": (8, 40),
    "train": {**CPU["train"], "epochs": 1, "num_samples": 400, "max_steps_per_epoch": 2},
    "atol": 1e-5,
}


def check_export(model: torch.nn.Module, x: torch.Tensor, atol: float) -> dict:
    """Export ``model`` with :func:`pnnh.to_plain` and check it: outputs on ``x`` equal the
    model's (allclose at ``atol``, absolute and relative, both evaluated in float64 so that the
    check is of the functions, not of float32 rounding; the float32 difference is recorded
    too), and no skip is found in it.

    Also counts the skips :func:`find_skips` reports in the *training* form: with a fixed
    ``A = I`` its fused path computes ``relu(x + D relu(E x + b1) + b2)`` literally, an exact
    reparametrization of the plain net that the checker rightly calls residual."""
    from pnnh.export import to_plain
    from pnnh.plainness import find_skips

    model = model.eval()
    plain = to_plain(model)
    with torch.no_grad():
        ref, out = model(x), plain(x)
        # the same comparison in float64: float32 rounding over 1000 layers alone moves logits
        # of size ~60 by ~1e-4, in the model as much as in its export
        ref64 = copy.deepcopy(model).double()(x.double())
        out64 = copy.deepcopy(plain).double()(x.double())
    skips = find_skips(plain, x[:8])
    training_form_skips = len(find_skips(model, x[:8]))
    weight_layers = sum(isinstance(m, (torch.nn.Linear, torch.nn.Conv1d)) for m in plain)
    return {"modules": len(plain), "weight_layers": weight_layers,
            "max_abs_diff": float((ref64 - out64).abs().max()),
            "outputs_equal": bool(torch.allclose(ref64, out64, atol=atol, rtol=atol)),
            "max_abs_diff_float32": float((ref - out).abs().max()),
            "max_abs_logit": float(ref.abs().max()),
            "float32_predictions_agree": float((ref.argmax(1) == out.argmax(1)).float().mean()),
            "atol": atol, "skips": [str(s) for s in skips], "plain": not skips,
            "training_form_skips": training_form_skips,
            "module_types": sorted({type(m).__name__ for m in plain})}


def _plot(curves: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for depth in sorted({c["depth"] for c in curves}):
        pts = [c for c in curves if c["depth"] == depth]
        ep = [c["epoch"] for c in pts]
        ax_loss.plot(ep, [c["train_loss"] for c in pts], marker="o", label=f"{depth} layers")
        ax_acc.plot(ep, [c["test_acc"] for c in pts], marker="o", label=f"{depth} layers")
    ax_loss.set_yscale("log")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("train loss")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("test accuracy")
    for ax in (ax_loss, ax_acc):
        ax.legend()
    fig.suptitle("PNNH MLP on MNIST-1D (no skip connections)")
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)


def run(out: Path, scale: str = "cpu", device: str = "auto", seed: int = 0) -> dict:
    """Train both depths, export and check the deepest, write the files; returns the summary."""
    from pnnh.checkpoint import load_model
    from pnnh.data import get_dataset
    from pnnh.reproduce.pnnh_accuracy import _run as train_or_reuse

    out, cfg = Path(out), QUICK if scale == "quick" else CPU
    rows, curves = [], []
    for depth in cfg["depths"]:
        run_dir = out / "runs" / f"{cfg['model']}_w{cfg['width']}_d{depth}"
        s = train_or_reuse(run_dir, {"model": cfg["model"], "dataset": cfg["dataset"],
                                     "depth": depth, "width": cfg["width"], **cfg["train"]},
                           device, seed)
        rows.append({"depth": depth, "width": cfg["width"], "params": s["params"],
                     "final_test_acc": s["final_val_acc"], "best_test_acc": s["best_val_acc"],
                     "final_train_loss": s["final_train_loss"], "time_s": round(s["time_s"], 1),
                     "run": str(run_dir)})
        curves += [{"depth": depth, "epoch": m["epoch"], "train_loss": m["train_loss"],
                    "test_acc": m["val_acc"]} for m in read_jsonl(run_dir / "metrics.jsonl")]
        write_records(rows, out, "results")
    write_records(curves, out, "curves")
    _plot(curves, out / "training_curves.png")

    deep = rows[-1]
    model, _ = load_model(Path(deep["run"]) / "checkpoints" / "last.pt")
    _, test = get_dataset(cfg["dataset"], num_samples=cfg["train"].get("num_samples"))
    export = {"depth": deep["depth"], **check_export(model, test.tensors[0], cfg["atol"])}
    atomic_write_json(out / "export.json", export)

    gap = 100.0 * (deep["final_test_acc"] - rows[0]["final_test_acc"])
    summary = {"rows": rows, "gap_points": gap, "within_1pt": gap >= -1.0, "export": export,
               "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()}}
    for r in rows:
        print(f"PNNH MLP depth {r['depth']:>5} width {r['width']}: test acc "
              f"{r['final_test_acc']:.4f} (best {r['best_test_acc']:.4f}), "
              f"{r['params']:,} params, {r['time_s']:.0f} s")
    print(f"gap {gap:+.2f} points (target >= -1); export: {export['weight_layers']} weight "
          f"layers, max |diff| {export['max_abs_diff']:.2e} in float64 (equal "
          f"{export['outputs_equal']}), {export['max_abs_diff_float32']:.2e} in float32 on "
          f"logits up to {export['max_abs_logit']:.1f}, "
          f"skips found {len(export['skips'])} (training form: "
          f"{export['training_form_skips']}, the fused reparametrization)")
    return summary
