"""PNNH at ResNet cost: training images/s, parameters and the exported network, interleaved.

    nice -n 10 .venv/bin/python benchmarks/parity.py [--threads 1 2] [--repeats 7] [--quick]
    python benchmarks/parity.py --device cuda --threads 1 [--inner 10]     # on a GPU

Contenders, at their registry defaults, each PNNH against the zero-initialised post-activation
ResNet of the same depth and width (``zero_init_residual=True``):

- ``cifar20/56/110``: ``pnnh{d}`` vs ``resnet{d}``, input (3, 32, 32), batch 128, SGD(momentum);
- ``mlp100`` at batch 128 and 1024: ``pnnh_mlp`` vs ``resnet_mlp`` (depth 100, width 128), AdamW;
- ``cnn1d100``: ``pnnh_cnn1d`` vs ``resnet_cnn1d`` (depth 100, width 32), batch 128, AdamW;
- ``vit12``: ``pnnh_vit_tiny`` vs the pre-norm ``vit_tiny`` (12 blocks, width 64, MNIST-1D
  sequences, 10 tokens), batch 128, AdamW (not in the default set: ``--configs vit12``).

train: one step = forward + cross-entropy + backward + optimizer step + the model's
``after_optimizer_step`` hooks (none for the default fixed coder). infer (CIFAR only): eval-mode
``no_grad`` forward of the ResNet, the PNNH model, its lean export (:func:`pnnh.export.to_plain`)
and the full export (``lean=False``, what the export was before). For every thread count all
contenders are timed round-robin (each repeat times each once, order rotated), and the speed
ratio is the median over repeats of ``t_resnet / t_pnnh`` of the same repeat. On ``--device
cuda`` the models and batches live on the GPU and each timing waits for its kernels
(``torch.cuda.synchronize``); ``--inner N`` times N calls per measurement, so that one
measurement spans more than a few kernel launches.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import machine_info, machine_label, save_results, time_round_robin, train_step  # noqa: E402

from pnnh.export import to_plain  # noqa: E402
from pnnh.models import count_parameters, create_model  # noqa: E402

MLP, CNN = {"depth": 100, "width": 128}, {"depth": 100, "width": 32}
# label, pnnh, resnet, kwargs, input, batch, optimizer
CONFIGS = [("cifar20", "pnnh20", "resnet20", {}, (3, 32, 32), 128, "sgd"),
           ("cifar56", "pnnh56", "resnet56", {}, (3, 32, 32), 128, "sgd"),
           ("cifar110", "pnnh110", "resnet110", {}, (3, 32, 32), 128, "sgd"),
           ("mlp100", "pnnh_mlp", "resnet_mlp", MLP, (1, 40), 128, "adamw"),
           ("mlp100", "pnnh_mlp", "resnet_mlp", MLP, (1, 40), 1024, "adamw"),
           ("cnn1d100", "pnnh_cnn1d", "resnet_cnn1d", CNN, (1, 40), 128, "adamw")]
EXTRA = [("vit12", "pnnh_vit_tiny", "vit_tiny", {"depth": 12}, (1, 40), 128, "adamw")]
QUICK = [("cifar20", "pnnh20", "resnet20", {"width": 4}, (3, 16, 16), 4, "sgd"),
         ("mlp8", "pnnh_mlp", "resnet_mlp", {"depth": 8, "width": 16}, (1, 40), 4, "adamw")]


def _optimizer(name: str, model: torch.nn.Module) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    return torch.optim.AdamW(model.parameters(), lr=1e-3)


def _infer(model: torch.nn.Module, x: torch.Tensor):
    model.eval()

    def fwd() -> None:
        with torch.no_grad():
            model(x)
    return fwd


def _contenders(configs, device: str = "cpu") -> tuple[dict, dict]:
    """``fns[(config, batch, mode, who)]`` to time and ``params`` of each, exports checked."""
    fns, params = {}, {}
    for label, pnnh, resnet, kw, shape, batch, opt in configs:
        torch.manual_seed(0)
        x, y = torch.randn(batch, *shape).to(device), torch.randint(0, 10, (batch,)).to(device)
        models = {"resnet": create_model(resnet, in_shape=shape, zero_init_residual=True,
                                         **kw).to(device),
                  "pnnh": create_model(pnnh, in_shape=shape, **kw).to(device)}
        for who, m in models.items():
            fns[(label, batch, "train", who)] = train_step(m.train(), x, y, _optimizer(opt, m))
            params[(label, batch, "train", who)] = count_parameters(m)
        if not label.startswith("cifar"):
            continue
        eval_models = {"resnet": create_model(resnet, in_shape=shape, **kw).to(device).eval(),
                       "pnnh": create_model(pnnh, in_shape=shape, **kw).to(device).eval()}
        p = eval_models["pnnh"]
        eval_models["pnnh export (lean)"] = to_plain(p).to(device)
        eval_models["pnnh export (full)"] = to_plain(p, lean=False).to(device)
        with torch.no_grad():
            ref = p(x)
            for k in ("pnnh export (lean)", "pnnh export (full)"):
                err = float((eval_models[k](x) - ref).abs().max())
                # cuDNN's convolutions may use TF32 (10-bit mantissa) on a GPU: a looser bound
                tol = 1e-4 if device == "cpu" else 2e-3
                assert err <= tol * max(1.0, float(ref.abs().max())), (label, k, err)
        for who, m in eval_models.items():
            fns[(label, batch, "infer", who)] = _infer(m, x)
            params[(label, batch, "infer", who)] = count_parameters(m)
    return fns, params


def _rows(times: dict, params: dict, threads: int) -> list[dict]:
    rows = []
    for (label, batch, mode, who), ts in times.items():
        base = times[(label, batch, mode, "resnet")]
        rows.append({
            "config": label, "batch": batch, "mode": mode, "model": who, "threads": threads,
            "params": params[(label, batch, mode, who)],
            "param_ratio": params[(label, batch, mode, who)] / params[(label, batch, mode, "resnet")],
            "images_per_s": batch / statistics.median(ts), "seconds": ts,
            "speed_vs_resnet": statistics.median(b / t for b, t in zip(base, ts))})
    return rows


def _print(rows: list[dict]) -> None:
    print(f"{'thr':>3} {'config':<9} {'batch':>5} {'mode':<5} {'model':<20} {'params':>10} "
          f"{'x params':>8} {'img/s':>9} {'x resnet':>8}")
    for r in rows:
        print(f"{r['threads']:>3} {r['config']:<9} {r['batch']:>5} {r['mode']:<5} {r['model']:<20} "
              f"{r['params']:>10,} {r['param_ratio']:>8.2f} {r['images_per_s']:>9.1f} "
              f"{r['speed_vs_resnet']:>8.3f}")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--inner", type=int, default=1, help="calls per measurement (averaged)")
    p.add_argument("--configs", nargs="+", default=None,
                   help="labels to run (cifar20 cifar56 cifar110 mlp100 cnn1d100 vit12); "
                        "default all but vit12")
    p.add_argument("--name", default="parity", help="results file name")
    p.add_argument("--out", type=Path, default=None, help="results directory")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny models, 2 repeats")
    args = p.parse_args(argv)
    configs = QUICK if args.quick else (CONFIGS if args.configs is None else
                                        [c for c in CONFIGS + EXTRA if c[0] in args.configs])
    if args.quick:
        args.repeats, args.threads = 2, [2]
    fns, params = _contenders(configs, args.device)
    rows, info = [], machine_info(args.device)
    info["loadavg_before"] = info["loadavg_1_5_15"]
    for threads in args.threads:
        torch.set_num_threads(threads)
        rows += _rows(time_round_robin(fns, args.repeats, inner=args.inner, device=args.device),
                      params, threads)
    info.update(machine_info(args.device))
    print(f"{machine_label(info)}, torch {info['torch']}, repeats {args.repeats} x {args.inner}, "
          f"load {info['loadavg_before']} -> {info['loadavg_1_5_15']}")
    _print(rows)
    return save_results(args.name, args, info, results=rows)


if __name__ == "__main__":
    main()
