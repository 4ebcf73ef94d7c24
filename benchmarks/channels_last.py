"""Channels-last on the CPU: training images/s per model, NCHW vs NHWC, beside the GEMM ceiling.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/channels_last.py [--quick]

One training step as ``pnnh train`` takes it (forward, cross-entropy, backward, SGD with
Nesterov momentum, the model's ``after_optimizer_step`` hooks) on Fashion-MNIST-shaped input
``(1, 28, 28)``, batch 128, for the registry's 2-D models at their defaults: ``plain``,
``resnet`` and ``pnnh`` at depth 20 and 56, and ``vit_tiny`` / ``pnnh_vit_tiny`` with 4x4
patches. Each model runs in the default memory format (NCHW) and in channels-last (model and
batch ``.to(memory_format=torch.channels_last)``), every contender once per round, interleaved
with a float32 GEMM (``--gemm-size``) that gives the machine's ceiling in the same minutes;
medians. Printed per model: images/s in each format, their ratio, and the share of the GEMM
ceiling the faster one reaches (step FLOPs from ``FlopCounterMode``). ``pnnh train`` turns
channels-last on by default for a model with a 2-D convolution (:func:`pnnh.train.
use_channels_last`); this is the measurement behind that default.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import machine_info, median, save_results, time_round_robin, train_step  # noqa: E402
from machine_ceiling import step_flops  # noqa: E402

from pnnh.models import create_model  # noqa: E402

MODELS = {"plain20": {}, "resnet20": {}, "pnnh20": {}, "plain56": {}, "resnet56": {},
          "pnnh56": {}, "vit_tiny": {"patch_size": 4}, "pnnh_vit_tiny": {"patch_size": 4}}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--gemm-size", type=int, default=2048)
    p.add_argument("--out", type=Path, default=None, help="results directory")
    p.add_argument("--quick", action="store_true", help="smoke run: two models, batch 8, 1 repeat")
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.batch, args.repeats, args.gemm_size = ["plain20", "vit_tiny"], 8, 1, 256
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (args.batch,), generator=g)
    n = args.gemm_size
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    fns, flops = {"gemm": lambda: torch.mm(a, b)}, {"gemm": 2 * n ** 3}
    for name in args.models:
        torch.manual_seed(0)
        model = create_model(name, in_shape=(1, 28, 28), num_classes=10, **MODELS[name])
        flops[name] = step_flops(model, x, y)
        for fmt in ("nchw", "nhwc"):
            m = copy.deepcopy(model)
            xb = x
            if fmt == "nhwc":
                m = m.to(memory_format=torch.channels_last)
                xb = x.contiguous(memory_format=torch.channels_last)
            opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, nesterov=True)
            fns[f"{name} {fmt}"] = train_step(m, xb, y, opt)
    times = time_round_robin(fns, args.repeats)
    ceiling = flops["gemm"] / median(times["gemm"])
    rows = []
    print(f"GEMM ceiling: {ceiling / 1e9:.1f} GFLOP/s ({args.threads} threads)")
    print(f"{'model':16s} {'NCHW img/s':>11s} {'NHWC img/s':>11s} {'NHWC/NCHW':>10s} "
          f"{'share of GEMM':>14s}")
    for name in args.models:
        nchw, nhwc = (args.batch / median(times[f"{name} {f}"]) for f in ("nchw", "nhwc"))
        best = max(nchw, nhwc)
        share = flops[name] / args.batch * best / ceiling
        rows.append({"model": name, "nchw_images_per_s": nchw, "nhwc_images_per_s": nhwc,
                     "ratio": nhwc / nchw, "step_flops": flops[name], "share_of_gemm": share})
        print(f"{name:16s} {nchw:11.0f} {nhwc:11.0f} {nhwc / nchw:10.2f} {share:14.3f}")
    return save_results("channels_last", args, machine_info(), gemm_flops_per_s=ceiling,
                        rows=rows, seconds={k: v for k, v in times.items()})


if __name__ == "__main__":
    main()
