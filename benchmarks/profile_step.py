"""``torch.profiler`` top operators of one PNNH training step and one ResNet step, side by side.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/profile_step.py [--model cifar20|mlp100] [--top 12]

Each model (registry defaults; the ResNet zero-initialised) takes ``--warmup`` steps, then
``--steps`` profiled steps (forward + cross-entropy + backward + optimizer step + hooks); the
table lists the operators with the largest self CPU time, their call counts per step, and the
same operator in the other model, as markdown (for docs/BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import train_step  # noqa: E402

from pnnh.models import create_model  # noqa: E402

SETUPS = {  # pnnh, resnet, kwargs, input, batch, optimizer
    "cifar20": ("pnnh20", "resnet20", {}, (3, 32, 32), 128, "sgd"),
    "mlp100": ("pnnh_mlp", "resnet_mlp", {"depth": 100, "width": 128}, (1, 40), 128, "adamw"),
    "quick": ("pnnh20", "resnet20", {"width": 4}, (3, 16, 16), 4, "sgd"),
}


def profile_step(name: str, kw: dict, shape, batch: int, opt: str, steps: int,
                 warmup: int) -> dict[str, tuple[float, int]]:
    """``{op: (self CPU ms per step, calls per step)}`` of one model's training step."""
    torch.manual_seed(0)
    model = create_model(name, in_shape=shape, **kw).train()
    x, y = torch.randn(batch, *shape), torch.randint(0, 10, (batch,))
    o = (torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9) if opt == "sgd"
         else torch.optim.AdamW(model.parameters(), lr=1e-3))
    step = train_step(model, x, y, o)
    for _ in range(warmup):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    return {e.key: (e.self_cpu_time_total / 1000 / steps, e.count // steps)
            for e in prof.key_averages()}


def table(pnnh: dict, resnet: dict, top: int) -> str:
    keys = sorted(set(pnnh) | set(resnet),
                  key=lambda k: -max(pnnh.get(k, (0, 0))[0], resnet.get(k, (0, 0))[0]))[:top]
    lines = ["| operator | PNNH ms/step | PNNH calls | ResNet ms/step | ResNet calls |",
             "|---|---:|---:|---:|---:|"]
    for k in keys:
        p, r = pnnh.get(k, (0.0, 0)), resnet.get(k, (0.0, 0))
        lines.append(f"| `{k}` | {p[0]:.2f} | {p[1]} | {r[0]:.2f} | {r[1]} |")
    tp, tr = sum(v[0] for v in pnnh.values()), sum(v[0] for v in resnet.values())
    cp, cr = sum(v[1] for v in pnnh.values()), sum(v[1] for v in resnet.values())
    lines.append(f"| **all operators** | {tp:.2f} | {cp} | {tr:.2f} | {cr} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="cifar20", choices=sorted(SETUPS))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--top", type=int, default=12)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    pnnh, resnet, kw, shape, batch, opt = SETUPS[args.model]
    res_kw = {**kw, "zero_init_residual": True}
    prof_p = profile_step(pnnh, kw, shape, batch, opt, args.steps, args.warmup)
    prof_r = profile_step(resnet, res_kw, shape, batch, opt, args.steps, args.warmup)
    out = (f"{pnnh} vs {resnet} (zero-init), batch {batch}, {opt}, threads {args.threads}, "
           f"{args.steps} profiled steps\n\n" + table(prof_p, prof_r, args.top))
    print(out)
    return out


if __name__ == "__main__":
    main()
