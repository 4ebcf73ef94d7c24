"""Parameter efficiency: the smallest PNNH that matches a ResNet-20-size baseline on MNIST-1D.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/param_efficiency.py [--quick]

Family: the MLP (``resnet_mlp`` / ``pnnh_mlp``, depth 20 = stem + 9 blocks + head, width 128;
the ResNet baseline has 0.30M parameters, about a CIFAR ResNet-20's 0.27M). Why the MLP and
not the 1-D CNN: on 2 shared CPU cores a width-128 MLP step costs a fraction of a width-32
Conv1d step on 40 positions, so every candidate can be trained with several seeds inside
the time budget; and the MLP is the family of the design's prototype table, so the numbers
can be set beside it.

Candidates vary the PNNH learner width (hidden units beside the coder), the coder ratio
``r`` (coder units ``m = r·width``) and the width itself. Every model is trained with the same
budget (AdamW 1e-3, cosine schedule, batch 128, ``--epochs``, ``--seeds`` seeds; MNIST-1D,
``--num-samples`` generated offline, 80/20 split) and scored by its final validation accuracy,
averaged over seeds. The baseline is the better of two ResNets of the same size: He init
(``resnet_mlp``) and zero-initialised residual branches (``zero_init_residual=True``). A
candidate *matches* when its mean is at least the baseline's mean minus ``--tolerance``
(0.5 points). The table lists parameters, the ratio baseline / candidate
and the accuracies; the smallest matching candidate is named at the end.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import machine_info, save_results  # noqa: E402

from pnnh.registry import count_parameters, create_model  # noqa: E402
from pnnh.train import train  # noqa: E402

# (model, width, model_args): the ResNet baselines first
CANDIDATES = [
    ("resnet_mlp", 128, {}),
    ("resnet_mlp", 128, {"zero_init_residual": True}),
    ("pnnh_mlp", 128, {"learner_width": 128}),
    ("pnnh_mlp", 128, {"learner_width": 64}),
    ("pnnh_mlp", 128, {"learner_width": 32}),
    ("pnnh_mlp", 128, {"learner_width": 16}),
    ("pnnh_mlp", 128, {"learner_width": 32, "coder_ratio": 0.5}),
    ("pnnh_mlp", 64, {"learner_width": 64}),
]


def label(name: str, width: int, kw: dict) -> str:
    if not name.startswith("pnnh"):
        zero = ", zero-init residual" if kw.get("zero_init_residual") else ""
        return f"{name.split('_')[0]} w={width}{zero}"
    return f"pnnh w={width} lw={kw.get('learner_width', width)} r={kw.get('coder_ratio', 1.0):g}"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--depth", type=int, default=20)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--num-samples", type=int, default=10000)
    p.add_argument("--tolerance", type=float, default=0.5, help="accuracy points")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None, help="results directory")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny data, 1 epoch, 3 models")
    args = p.parse_args(argv)
    candidates = CANDIDATES
    max_steps = None
    if args.quick:
        args.depth, args.epochs, args.seeds, args.num_samples = 8, 1, 1, 400
        candidates = [(m, 16, {k: max(1, v // 8) if k == "learner_width" else v
                               for k, v in kw.items()}) for m, _, kw in CANDIDATES[:3]]
        max_steps = 2
    torch.set_num_threads(args.threads)
    load_before = machine_info()["loadavg_1_5_15"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, width, kw in candidates:
            accs = []
            t0 = time.perf_counter()
            for seed in range(args.seeds):
                summary = train({
                    "model": name, "dataset": "mnist1d", "depth": args.depth, "width": width,
                    "model_args": kw, "epochs": args.epochs, "batch_size": 128, "lr": 1e-3,
                    "optimizer": "adamw", "schedule": "cosine", "seed": seed, "device": "cpu",
                    "num_samples": args.num_samples, "out": f"{tmp}/{len(rows)}_{seed}",
                    "progress": False, "checkpoint_every": args.epochs,
                    "max_steps_per_epoch": max_steps})
                accs.append(100.0 * summary["final_val_acc"])
            params = count_parameters(create_model(name, depth=args.depth, width=width, **kw))
            rows.append({"label": label(name, width, kw), "model": name, "width": width, "model_args": kw,
                         "params": params, "val_acc": accs, "mean": statistics.mean(accs),
                         "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                         "seconds": time.perf_counter() - t0})
            print(f"  {rows[-1]['label']}: {rows[-1]['mean']:.2f} ({rows[-1]['seconds']:.0f} s)", flush=True)
    # the baseline: the better of the ResNets (He init / zero-init residual branches)
    base = max((r for r in rows if r["model"] != "pnnh_mlp"), key=lambda r: r["mean"])
    for r in rows:
        r["baseline"] = r is base
        r["param_ratio"] = base["params"] / r["params"]  # > 1: fewer parameters than the ResNet
        r["delta_points"] = r["mean"] - base["mean"]
        r["matches"] = r["model"] == "pnnh_mlp" and r["delta_points"] >= -args.tolerance
    matching = [r for r in rows if r["matches"]]
    best = min(matching, key=lambda r: r["params"]) if matching else None
    info = machine_info()
    info["loadavg_before"] = load_before
    print(f"MNIST-1D ({args.num_samples} samples), MLP depth {args.depth}, {args.epochs} epochs, "
          f"{args.seeds} seeds; final val accuracy (%), mean ± std; torch {info['torch']}, "
          f"threads {torch.get_num_threads()}")
    print(f"{'model (* baseline)':<34} {'params':>9} {'resnet/x':>8} {'acc':>7} {'±':>5} {'Δ pts':>6} match")
    for r in rows:
        name = r["label"] + (" *" if r["baseline"] else "")
        print(f"{name:<34} {r['params']:>9,} {r['param_ratio']:>8.2f} {r['mean']:>7.2f} "
              f"{r['std']:>5.2f} {r['delta_points']:>+6.2f} {'yes' if r['matches'] else '-'}")
    if best:
        print(f"smallest match: {best['label']} with {best['params']:,} parameters, "
              f"{best['param_ratio']:.2f}x fewer than the ResNet ({base['params']:,})")
    else:
        print(f"no PNNH candidate within {args.tolerance} points of the ResNet")
    return save_results("param_efficiency", args, info, results=rows, baseline=base["label"],
                        smallest_match=best["label"] if best else None,
                        param_ratio=best["param_ratio"] if best else None)


if __name__ == "__main__":
    main()
