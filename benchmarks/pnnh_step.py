"""Training-step time of PNNH vs ResNet at equal depth, and what trainable coders cost.

The parity measurement at the defaults (CIFAR, MLP, CNN1d; 1 and 2 threads) is
``benchmarks/parity.py``; this script compares the coder options on one MLP or CNN1d.

    OMP_NUM_THREADS=1 python benchmarks/pnnh_step.py [--depth 100] [--width 128] [--family mlp]

One step = forward + cross-entropy + backward + AdamW step + ``after_optimizer_step`` hooks,
batch 128 on random MNIST-1D-shaped data. The variants are timed round-robin (each repeat
times every variant once, in a rotated order) so that a shared machine's load affects them
alike; the median per variant is reported with its ratio to the ResNet.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import time_round_robin, train_step  # noqa: E402

from pnnh import count_parameters, create_model  # noqa: E402

VARIANTS = {
    "resnet (zero-init residual)": ("resnet", {"zero_init_residual": True}),
    "pnnh, fixed coder (default)": ("pnnh", {}),
    "pnnh, no constraint": ("pnnh", {"coder_constraint": "none"}),
    "pnnh, newton_schulz": ("pnnh", {"coder_constraint": "newton_schulz"}),
    "pnnh, newton_schulz every 4": ("pnnh", {"coder_constraint": "newton_schulz",
                                             "project_every": 4}),
    "pnnh, procrustes (SVD)": ("pnnh", {"coder_constraint": "procrustes"}),
    "pnnh, newton_schulz, learner_width=width/2": ("pnnh", {"coder_constraint": "newton_schulz",
                                                            "learner_width": None}),
    "pnnh, newton_schulz, lw=width/2, r=0.5": ("pnnh", {"coder_constraint": "newton_schulz",
                                                        "learner_width": None, "coder_ratio": 0.5}),
}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--family", default="mlp", choices=["mlp", "cnn1d"])
    p.add_argument("--depth", type=int, default=100)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args()
    torch.manual_seed(0)
    x, y = torch.randn(args.batch, 1, 40), torch.randint(0, 10, (args.batch,))
    models, fns = {}, {}
    for label, (kind, kw) in VARIANTS.items():
        kw = dict(kw)
        if "learner_width" in kw:
            kw["learner_width"] = args.width // 2
        model = create_model(f"{kind}_{args.family}", depth=args.depth, width=args.width, **kw)
        models[label] = model
        fns[label] = train_step(model, x, y, torch.optim.AdamW(model.parameters(), lr=1e-3))
    times = time_round_robin(fns, args.repeats, inner=args.steps)
    base = statistics.median(next(iter(times.values())))
    print(f"{args.family}, depth {args.depth}, width {args.width}, batch {args.batch}, "
          f"threads {torch.get_num_threads()}")
    print(f"{'variant':<44} {'params':>10} {'ms/step':>8} {'x resnet':>8}")
    for label, model in models.items():
        med = statistics.median(times[label])
        print(f"{label:<44} {count_parameters(model):>10,} {1000 * med:>8.1f} {med / base:>8.2f}")


if __name__ == "__main__":
    main()
