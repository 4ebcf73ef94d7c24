"""Experiment ``shortcut-depth-images``: paper 3's training study on real images.

"Demystifying ResNet" (Li et al.) claims that small-weight initialisation with shortcuts of
depth 2 beats Xavier, orthogonal initialisation and deeper shortcuts: final loss, learning
dynamics, stability and the Hessian along training. This is part (b) of ``shortcut-depth``
(:func:`pnnh.reproduce.shortcut_depth.training_study`, the same nets and settings at each
scale) on Fashion-MNIST instead of MNIST-1D: a deep ReLU ``shortcut_mlp`` (no normalisation;
``--scale cpu``: 38 weight layers, width 32, on the flattened 28×28 image) trained by SGD
(lr 0.01, momentum 0.9, batch 128, 1,000 steps) from small-init ``k = 2`` against Xavier
``k = 2``, orthogonal ``k = 2``, small-init ``k = 3`` and ``k = 1``; every 100 steps the loss
on the whole training subset, test accuracy on the 10,000 test images, and the Hessian's λmax
and λmin (Lanczos, tol 1e-3) on a fixed batch of 256 training images.

``--scale cpu``: a fixed 10,000-image training subset (the first 10,000 of a seed-0
permutation), ~1.5 minutes here. ``--scale quick``: 512 images, 20 steps: seconds.
``--scale paper``: all 60,000 images, 98 layers, width 64, 8,000 steps (a GPU).
Writes ``training.csv/json``, ``training.png`` and ``shortcut_depth_images.json``.
"""

from __future__ import annotations

from pathlib import Path

from pnnh.io import atomic_write_json
from pnnh.reproduce.shortcut_depth import SCALES, TRAIN_RUNS, plot_training, training_study

DESCRIPTION = ("paper 3 on Fashion-MNIST: small-init shortcut-2 training vs Xavier/orthogonal/"
               "shortcut-3/shortcut-1, loss and Hessian λmax along training")
CPU_MINUTES = 2  # measured: 1.5 minutes on the 2-core CPU
NUM_SAMPLES = {"quick": 512, "cpu": 10_000, "paper": None}


def run(out: Path, scale: str = "cpu", device: str = "auto", seed: int = 0) -> dict:
    from pnnh.train import pick_device

    out = Path(out)
    print(f"shortcut-depth-images ({scale}): training on Fashion-MNIST, Hessian tracked",
          flush=True)
    rows = training_study(SCALES[scale], seed, str(pick_device(device)), out,
                          dataset="fashion_mnist", num_samples=NUM_SAMPLES[scale])
    plot_training(rows, out / "training.png", title="Fashion-MNIST")
    finals = {}
    for label, _, _ in TRAIN_RUNS:
        mine = [r for r in rows if r["run"] == label]
        last = mine[-1]
        finals[label] = {"step": last["step"], "train_loss": last["train_loss"],
                         "val_acc": last["val_acc"], "lambda_max_start": mine[0]["lambda_max"],
                         "lambda_max": last["lambda_max"], "lambda_min": last["lambda_min"],
                         "diverged": last.get("diverged")}
        print(f"  final {label:<15} train_loss {last['train_loss']:.4f} "
              f"test acc {last['val_acc']:.3f}  λmax {mine[0]['lambda_max']:.4g} → "
              f"{last['lambda_max']:.4g}")
    summary = {"dataset": "fashion_mnist", "num_samples": NUM_SAMPLES[scale],
               "training_final": finals, "files": ["training.csv", "training.png"]}
    atomic_write_json(out / "shortcut_depth_images.json", summary)
    return summary
