"""Training and inference throughput: PNNH vs ResNet vs plain at equal depth (CIFAR-size input).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/throughput.py [--depths 20 56 110] [--quick]
    python benchmarks/throughput.py --device cuda [--inner 10]     # on a GPU (timings synchronised)

Models: the registry's ``resnet{d}`` (He init: ``zero_init_residual=False``, the registry
default of the CIFAR ResNets), ``plain{d}`` and ``pnnh{d}`` (width 16, 3 stages, BatchNorm;
PNNH at its defaults: fixed coder, no per-step hook), input
``(3, 32, 32)``, batch 128, ``torch.set_num_threads(2)``.

- train: images/s of one step = forward + cross-entropy + backward + SGD(momentum) step +
  the model's ``after_optimizer_step`` hooks (the PNNH coder projection);
- infer: images/s of an eval-mode, ``no_grad`` forward, for the three models and for PNNH and
  plain exported by :func:`pnnh.export.to_plain` (one ``nn.Sequential``, BatchNorm folded,
  lean). The PNNH-vs-zero-init-ResNet parity measurement is ``benchmarks/parity.py``.

Every contender is timed once per repeat, interleaved (order rotated each repeat); the table
shows medians and the ratio to the ResNet of the same depth. JSON: benchmarks/results/.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import machine_info, machine_label, median, save_results, time_round_robin, train_step  # noqa: E402

from pnnh.export import to_plain  # noqa: E402
from pnnh.models import count_parameters, create_model  # noqa: E402


def _train_fn(model, x, y):
    model.train()
    return train_step(model, x, y, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9))


def _infer_fn(model, x):
    model.eval()

    def fwd():
        with torch.no_grad():
            model(x)
    return fwd


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--depths", type=int, nargs="+", default=[20, 56, 110])
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--inner", type=int, default=1, help="calls per measurement (averaged)")
    p.add_argument("--out", type=Path, default=None, help="results directory")
    p.add_argument("--quick", action="store_true", help="smoke run: depth 8, batch 4, width 4, 1 repeat")
    args = p.parse_args(argv)
    if args.quick:
        args.depths, args.batch, args.repeats, args.width = [8], 4, 1, 4
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, 32, 32).to(args.device)
    y = torch.randint(0, 10, (args.batch,)).to(args.device)
    fns, meta = {}, {}
    for d in args.depths:
        models = {k: create_model(f"{k}{d}" if d in (20, 56, 110) else f"{k}20", depth=d,
                                  width=args.width).to(args.device) for k in ("resnet", "plain", "pnnh")}
        for k, m in models.items():
            fns[(d, k, "train")] = _train_fn(m, x, y)
            meta[(d, k, "train")] = count_parameters(m)
        exported = {}
        for k in ("plain", "pnnh"):
            models[k].eval()
            exported[f"{k} (exported)"] = to_plain(models[k]).to(args.device)
            err = (exported[f"{k} (exported)"](x) - models[k](x)).abs().max().item()
            assert err < 1e-3, f"{k}{d} export differs by {err}"
        for k, m in {**models, **exported}.items():
            fns[(d, k, "infer")] = _infer_fn(m, x)
            meta[(d, k, "infer")] = count_parameters(m)
    load_before = machine_info()["loadavg_1_5_15"]
    times = time_round_robin(fns, args.repeats, inner=args.inner, device=args.device)
    info = machine_info(args.device)
    info["loadavg_before"] = load_before
    rows = []
    for (d, k, mode), ts in times.items():
        t = median(ts)
        base = median(times[(d, "resnet", mode)])
        rows.append({"depth": d, "model": k, "mode": mode, "params": meta[(d, k, mode)],
                     "batch": args.batch, "seconds_median": t, "seconds": ts,
                     "images_per_s": args.batch / t, "speed_vs_resnet": base / t})
    print(f"batch {args.batch}, width {args.width}, threads {torch.get_num_threads()}, "
          f"repeats {args.repeats} x {args.inner}; "
          f"{machine_label(info)}, "
          f"torch {info['torch']}, load {load_before} -> {info['loadavg_1_5_15']}")
    print(f"{'depth':>5} {'mode':<6} {'model':<16} {'params':>9} {'img/s':>8} {'x resnet':>8}")
    for r in sorted(rows, key=lambda r: (r["depth"], r["mode"] != "train")):
        print(f"{r['depth']:>5} {r['mode']:<6} {r['model']:<16} {r['params']:>9,} "
              f"{r['images_per_s']:>8.1f} {r['speed_vs_resnet']:>8.2f}")
    return save_results("throughput", args, info, results=rows)


if __name__ == "__main__":
    main()
