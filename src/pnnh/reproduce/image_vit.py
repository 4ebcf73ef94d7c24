"""Experiment ``image-vit``: ViT vs PNNH-ViT vs plain ViT at depth on real images.

Paper 1's transformer claim on Fashion-MNIST (:func:`pnnh.data.get_dataset`): the registry's
pre-norm ViT (``vit_tiny``: residual additions), PNNH-ViT (``pnnh_vit_tiny``: the residual
stream carried through weight-shared coders, at its defaults a fixed ``A = I`` and exactly
the ViT's parameters, docs/PNNH_VIT.md) and the plain ViT (``plain_vit_tiny``: the same
blocks, no path) on ``(1, 28, 28)`` images cut into 4x4 patches (49 tokens), width 64, 4
heads, MLP ratio 4, at 4 and 12 transformer blocks.

**The CPU protocol** (``--scale cpu``; fixed before any run, not tuned, the test split only
reported): the 10,000-image training subset of ``image-depth``, the whole test split, AdamW
(lr 1e-3, weight decay 0.05 on weights, the PNNH-ViT protocol of docs/PNNH_VIT.md), 0.3
epochs of warm-up then cosine, batch 128, 3 epochs, no augmentation; seeds 0 and 1, in whole
seeds (``CPU["plan"]``). Each run records what an ``image-depth`` run records
(:func:`pnnh.reproduce.image_depth.train_and_probe`: curves, paper 2's gradient-norm ratios,
paper 1's dissipation at the last block at init and after training).
``--scale paper``: all 60,000 images, 40 epochs, random crop + flip, seeds 0-2.
``--scale quick``: 4 blocks, two steps per epoch on 384 images: seconds, numbers meaningless.

Writes the files of ``image-depth`` (``results``, ``summary_table``, ``curves.png``) and
returns its tables.
"""

from __future__ import annotations

from pathlib import Path

from pnnh.io import write_records
from pnnh.reproduce.image_depth import finish, runs, train_and_probe

DESCRIPTION = "ViT vs PNNH-ViT vs plain ViT at 4/12 blocks on Fashion-MNIST"
CPU_MINUTES = 25

VARIANTS = {"vit": "vit_tiny", "pnnh_vit": "pnnh_vit_tiny", "plain_vit": "plain_vit_tiny"}
MODEL = {"width": 64, "heads": 4, "patch_size": 4}
TRAIN = {"dataset": "fashion_mnist", "optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.05,
         "schedule": "cosine", "warmup_epochs": 0.3, "batch_size": 128, "augment": False,
         "track_norms": 26}
KINDS = tuple(VARIANTS)
CPU = {"train": {**TRAIN, "epochs": 3, "num_samples": 10_000},
       "plan": [((4, 12), KINDS, (0,)), ((4, 12), KINDS, (1,))]}
QUICK = {"train": {**TRAIN, "epochs": 2, "num_samples": 512, "max_steps_per_epoch": 2,
                   "dataset_args": {"holdout": 0.25}},
         "plan": [((4,), KINDS, (0,))]}
PAPER = {"train": {**TRAIN, "epochs": 40, "augment": True},
         "plan": [((4, 12), KINDS, (0, 1, 2))]}


def run(out: Path, scale: str = "cpu", device: str = "auto", seed: int = 0) -> dict:
    """Train every run of the scale's plan (finished runs in ``out/runs`` are reused)."""
    out = Path(out)
    cfg = {"quick": QUICK, "cpu": CPU, "paper": PAPER}[scale]
    rows = []
    for depth, variant, s in runs(cfg["plan"]):
        rows.append(train_and_probe(out, variant, depth, VARIANTS[variant],
                                    {**MODEL, "depth": depth}, seed + s, cfg["train"], device))
        write_records([{k: v for k, v in r.items() if not k.endswith("_curve")} for r in rows],
                      out, "results")
    return finish(out, rows)
