"""Time per HVP of data-parallel curvature: ``torchrun`` with 2 ranks against 1, same batch.

Each rank holds its shard of the batch (``--samples`` in all) and every HVP is all-reduced
(:class:`~pnnh.probes.hessian.HessianOperator` under a process group), so the work per rank
halves while an all-reduce of ``P`` numbers is added. The launcher runs ``torchrun
--standalone --nproc-per-node N`` for N in ``--ranks`` (one thread per rank), each worker times
``--hvps`` HVPs after one warm-up and rank 0 reports the median; the ratio is the speed-up.

Where the time goes: with several ranks each worker also times an all-reduce of ``P`` float32
numbers on its own (the communication every HVP adds), and one more 1-rank run takes the
largest shard alone (``--samples / N`` samples: the compute a rank is left with, as if the
ranks cost nothing to run side by side). So ``2 ranks ≈ shard compute + all-reduce +
contention`` can be read off the table.

    .venv-ecosystem/bin/python benchmarks/hessian_ddp.py --model resnet18 --samples 32

Writes ``benchmarks/results/hessian_ddp.json``. ``--quick``: the tiny CNN, 3 HVPs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import machine_info, save_results  # noqa: E402
from models_real import MODELS  # noqa: E402


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(MODELS), default="resnet18")
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--hvps", type=int, default=5)
    p.add_argument("--ranks", default="1,2")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.model, args.hvps, args.samples = "tiny_cnn", 3, 8
    return args


def worker(args) -> None:
    """One rank: its shard, ``--hvps`` timed HVPs; rank 0 prints a JSON line."""
    from pnnh.device import Distributed
    from pnnh.probes.hessian import HessianOperator

    dist = Distributed("cpu")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = MODELS[args.model]().eval()
    x = torch.randn(args.samples, 3, args.image_size, args.image_size)
    y = torch.randint(0, 10, (args.samples,))
    shard = (torch.tensor_split(x, dist.world)[dist.rank], torch.tensor_split(y, dist.world)[dist.rank])
    op = HessianOperator(model, shard, progress=False)
    v = torch.randn(op.dim, generator=torch.Generator().manual_seed(1))
    op.hvp(v)  # warm-up: the graph, the HVP kind
    times = []
    for _ in range(args.hvps):
        t0 = time.perf_counter()
        op.hvp(v)
        times.append(time.perf_counter() - t0)
    reduce = []
    if dist.world > 1:  # the communication alone: one all-reduce of P numbers, as per HVP
        buf = torch.randn(op.dim)
        for _ in range(args.hvps):
            torch.distributed.barrier()
            t0 = time.perf_counter()
            torch.distributed.all_reduce(buf)
            reduce.append(time.perf_counter() - t0)
    if dist.is_main:
        print("RESULT " + json.dumps({
            "ranks": dist.world, "samples_per_rank": int(shard[0].shape[0]),
            "seconds_per_hvp": statistics.median(times), "params": op.dim,
            "seconds_per_all_reduce": statistics.median(reduce) if reduce else None}),
            flush=True)
    dist.close()


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    if int(os.environ.get("WORLD_SIZE", "0")) >= 1:
        worker(args)
        return {}
    torchrun = Path(sys.executable).with_name("torchrun")
    load_before = list(os.getloadavg())
    rows = []
    ranks = [int(r) for r in args.ranks.split(",")]
    shard = -(-args.samples // max(ranks))  # the largest shard, alone on 1 rank
    for n, samples in [(n, args.samples) for n in ranks] + [(1, shard)]:
        cmd = [str(torchrun), "--standalone", "--nproc-per-node", str(n), __file__,
               "--model", args.model, "--samples", str(samples), "--hvps", str(args.hvps),
               "--image-size", str(args.image_size)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
        line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
        if out.returncode != 0 or not line:
            raise SystemExit(f"torchrun with {n} ranks failed:\n{out.stderr[-2000:]}")
        rows.append(json.loads(line[-1][len("RESULT "):]))
        r = rows[-1]
        comm = ("" if r["seconds_per_all_reduce"] is None
                else f"; an all-reduce alone {r['seconds_per_all_reduce']:.4f} s")
        print(f"{n} rank(s), {r['samples_per_rank']} samples each: {r['seconds_per_hvp']:.4f} "
              f"s per HVP{comm}", flush=True)
    base = rows[0]["seconds_per_hvp"]
    for r in rows:
        r["speedup"] = base / r["seconds_per_hvp"]
    torch.set_num_threads(args.threads)
    return save_results("hessian_ddp", args, {**machine_info(), "loadavg_before": load_before},
                        rows=rows)


if __name__ == "__main__":
    main()
