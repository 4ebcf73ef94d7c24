"""Machine ceiling: this machine's measured GEMM FLOP/s and the share a training step reaches.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/machine_ceiling.py [--quick]

The ceiling is a large float32 ``torch.mm`` (``--gemm-size`` n, 2n³ FLOPs per call). A
training step's FLOPs (forward + backward; matmuls and convolutions) are counted with
``torch.utils.flop_counter.FlopCounterMode`` on one step; the achieved rate is those FLOPs
over the measured step time (which also includes the elementwise work, the optimizer and the
PNNH coder projection, none of which the count includes). GEMM and steps are timed
interleaved (round-robin) so the shared machine's load hits them alike; medians.

Models: ``pnnh_mlp`` / ``resnet_mlp`` at depth 100, width 128 on MNIST-1D-shaped input
``(1, 40)`` (the design's prototype), and ``pnnh20`` / ``resnet20`` on CIFAR-size input;
batch 128, AdamW, the model's ``after_optimizer_step`` hooks.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import machine_info, median, save_results, time_round_robin, train_step  # noqa: E402

from pnnh.models import count_parameters, create_model  # noqa: E402


def step_flops(model, x, y) -> int:
    """Matmul/conv FLOPs of one forward + backward (FlopCounterMode counts 2 per MAC)."""
    with FlopCounterMode(display=False) as fc:
        F.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    return int(fc.get_total_flops())


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gemm-size", type=int, default=2048)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", type=Path, default=None, help="results directory")
    p.add_argument("--quick", action="store_true", help="smoke run: small GEMM and models")
    args = p.parse_args(argv)
    mlp_depth, mlp_width, cifar_width = 100, 128, 16
    if args.quick:
        args.gemm_size, args.batch, args.repeats = 256, 8, 1
        mlp_depth, mlp_width = 8, 16
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    n = args.gemm_size
    a, b = torch.randn(n, n), torch.randn(n, n)
    fns = {"gemm": lambda: torch.mm(a, b)}
    flops = {"gemm": 2 * n ** 3}
    params = {}
    xm, ym = torch.randn(args.batch, 1, 40), torch.randint(0, 10, (args.batch,))
    xc, yc = torch.randn(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,))
    setups = {
        f"pnnh_mlp d{mlp_depth} w{mlp_width}": (create_model(
            "pnnh_mlp", depth=mlp_depth, width=mlp_width), xm, ym),
        f"resnet_mlp d{mlp_depth} w{mlp_width}": (create_model(
            "resnet_mlp", depth=mlp_depth, width=mlp_width), xm, ym),
    }
    if not args.quick:  # the CIFAR pair (the smoke run keeps to the MLPs)
        setups["pnnh20 (cifar)"] = (create_model("pnnh20", width=cifar_width), xc, yc)
        setups["resnet20 (cifar)"] = (create_model("resnet20", width=cifar_width), xc, yc)
    for label, (model, x, y) in setups.items():
        flops[label] = step_flops(model, x, y)
        params[label] = count_parameters(model)
        fns[label] = train_step(model, x, y, torch.optim.AdamW(model.parameters(), lr=1e-3))
    load_before = machine_info()["loadavg_1_5_15"]
    times = time_round_robin(fns, args.repeats)
    info = machine_info()
    info["loadavg_before"] = load_before
    ceiling = flops["gemm"] / median(times["gemm"])
    rows = []
    for label, ts in times.items():
        t = median(ts)
        rate = flops[label] / t
        rows.append({"what": label, "params": params.get(label), "flops_per_call": flops[label],
                     "seconds_median": t, "seconds": ts, "flops_per_s": rate,
                     "share_of_gemm": rate / ceiling})
    print(f"threads {torch.get_num_threads()}, batch {args.batch}, GEMM {n}x{n} float32, "
          f"repeats {args.repeats}; {info['cpu_model']} ({info['nproc']} CPUs), torch "
          f"{info['torch']}, load {load_before} -> {info['loadavg_1_5_15']}")
    print(f"{'what':<28} {'GFLOP/call':>10} {'ms':>9} {'GFLOP/s':>8} {'of GEMM':>8}")
    for r in rows:
        print(f"{r['what']:<28} {r['flops_per_call'] / 1e9:>10.3f} {1e3 * r['seconds_median']:>9.1f} "
              f"{r['flops_per_s'] / 1e9:>8.2f} {r['share_of_gemm']:>8.1%}")
    return save_results("machine_ceiling", args, info, gemm_flops_per_s=ceiling, results=rows)


if __name__ == "__main__":
    main()
