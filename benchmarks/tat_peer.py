"""Deep vanilla-net peer: TAT (dks's leaky-ReLU kernel shaping) vs PNNH at depths 8 / 32 / 100.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/tat_peer.py [--quick]

On MNIST-1D, MLPs of width 128 at each depth, trained with the same budget (AdamW 1e-3,
cosine schedule, batch 128, ``--epochs``, ``--seeds`` seeds):

- ``plain + TAT``: ``plain_mlp`` rebuilt by :func:`pnnh.tat.apply_tat` — every ReLU becomes
  the TAT leaky ReLU whose slope gives the whole chain ``C(0) = η`` (η = 0.9, the TAT paper's
  and the design's choice; a chain of 7 ReLUs, depth 8, cannot reach 0.9 — plain ReLUs give
  only 0.81 — so depth 8 uses ``--shallow-eta`` 0.7) and SUO (orthogonal) weights, zero biases;
  the transform equals ``dks``'s (``tests/test_tat.py``);
- ``pnnh``: ``pnnh_mlp`` with its defaults (coder ratio 1, Newton–Schulz projection, zero-init
  learner decoder);
- ``resnet``: ``resnet_mlp`` with zero-initialised residual branches (on MNIST-1D the He-init
  ResNet MLP is far weaker: ``benchmarks/param_efficiency.py`` measures both);
- ``plain``: ``plain_mlp`` with He init, as the floor.

Accuracy: final validation accuracy, mean over seeds. Throughput: training steps (forward +
backward + AdamW + after-step hooks, batch 128) of fresh models timed round-robin, all depths
and models interleaved in one loop; images/s and the ratio to the ResNet of the same depth.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import machine_info, median, save_results, time_round_robin, train_step  # noqa: E402

from pnnh.models import count_parameters, create_model  # noqa: E402
from pnnh.tat import chain_c0  # noqa: E402
from pnnh.train import train  # noqa: E402

CONTENDERS = {  # label -> (model, model_args)
    "plain + TAT": ("plain_mlp", {"tat": True}),
    "pnnh": ("pnnh_mlp", {}),
    "resnet": ("resnet_mlp", {"zero_init_residual": True}),
    "plain": ("plain_mlp", {}),
}


def model_args(label: str, depth: int, eta: float, shallow_eta: float) -> dict:
    name, kw = CONTENDERS[label]
    kw = dict(kw)
    if kw.get("tat"):
        kw["tat_eta"] = eta if chain_c0(0.0, depth - 1) > eta else shallow_eta
    return kw


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--depths", type=int, nargs="+", default=[8, 32, 100])
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--seeds", type=int, default=2, help="0: throughput only, no training")
    p.add_argument("--num-samples", type=int, default=5000)
    p.add_argument("--eta", type=float, default=0.9)
    p.add_argument("--shallow-eta", type=float, default=0.7,
                   help="eta where a plain ReLU chain cannot reach --eta")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5, help="throughput repeats")
    p.add_argument("--threads", type=int, default=2, help="torch threads for the throughput")
    p.add_argument("--train-threads", type=int, default=1,
                   help="torch threads for the accuracy runs (1: lean on a shared machine, where "
                   "2 threads of small matmuls stall on each other)")
    p.add_argument("--out", type=Path, default=None, help="results directory")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny data and models")
    args = p.parse_args(argv)
    max_steps = None
    if args.quick:
        args.depths, args.width, args.epochs, args.seeds = [8], 16, 1, 1
        args.num_samples, args.batch, args.repeats, max_steps = 400, 16, 1, 2
    torch.set_num_threads(args.train_threads)
    load_before = machine_info()["loadavg_1_5_15"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for depth in args.depths:
            for label, (name, _) in CONTENDERS.items():
                kw = model_args(label, depth, args.eta, args.shallow_eta)
                accs = []
                for seed in range(args.seeds):
                    s = train({
                        "model": name, "dataset": "mnist1d", "depth": depth, "width": args.width,
                        "model_args": kw, "epochs": args.epochs, "batch_size": args.batch,
                        "lr": 1e-3, "optimizer": "adamw", "schedule": "cosine", "seed": seed,
                        "device": "cpu", "num_samples": args.num_samples,
                        "out": f"{tmp}/{depth}_{name}_{len(rows)}_{seed}", "progress": False,
                        "checkpoint_every": args.epochs, "max_steps_per_epoch": max_steps})
                    accs.append(100.0 * s["final_val_acc"])
                params = count_parameters(create_model(name, depth=depth, width=args.width, **kw))
                rows.append({"depth": depth, "model": label, "registry_name": name,
                             "model_args": kw, "params": params, "val_acc": accs,
                             "mean": statistics.mean(accs) if accs else None,
                             "std": statistics.stdev(accs) if len(accs) > 1 else 0.0})
                if accs:
                    print(f"  depth {depth} {label}: {rows[-1]['mean']:.2f}", flush=True)
    # throughput: fresh models, every depth and contender interleaved
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 1, 40)
    y = torch.randint(0, 10, (args.batch,))
    fns = {}
    for depth in args.depths:
        for label, (name, _) in CONTENDERS.items():
            model = create_model(name, depth=depth, width=args.width,
                                 **model_args(label, depth, args.eta, args.shallow_eta))
            fns[(depth, label)] = train_step(model, x, y,
                                             torch.optim.AdamW(model.parameters(), lr=1e-3))
    times = time_round_robin(fns, args.repeats, inner=3 if not args.quick else 1)
    for r in rows:
        t = median(times[(r["depth"], r["model"])])
        r["images_per_s"] = args.batch / t
        r["speed_vs_resnet"] = median(times[(r["depth"], "resnet")]) / t
    info = machine_info()
    info["loadavg_before"] = load_before
    print(f"MNIST-1D ({args.num_samples} samples), MLP width {args.width}, {args.epochs} epochs, "
          f"{args.seeds} seeds, batch {args.batch}; torch {info['torch']}, threads "
          f"{torch.get_num_threads()}, load {load_before} -> {info['loadavg_1_5_15']}")
    print(f"{'depth':>5} {'model':<12} {'eta':>4} {'params':>9} {'acc %':>6} {'±':>5} "
          f"{'img/s':>8} {'x resnet':>8}")
    for r in rows:
        eta = r["model_args"].get("tat_eta")
        acc = f"{r['mean']:>6.2f} {r['std']:>5.2f}" if r["mean"] is not None else f"{'-':>6} {'-':>5}"
        print(f"{r['depth']:>5} {r['model']:<12} {eta if eta else '':>4} {r['params']:>9,} "
              f"{acc} {r['images_per_s']:>8.0f} "
              f"{r['speed_vs_resnet']:>8.2f}")
    return save_results("tat_peer", args, info, results=rows)


if __name__ == "__main__":
    main()
