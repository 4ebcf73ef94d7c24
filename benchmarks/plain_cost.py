"""What the exact plain form of a ResNet costs: parameters, FLOPs and CPU inference time.

For torchvision's ResNet-18 and ResNet-50 and timm's pre-activation ResNetV2-50 (random init,
randomised BatchNorm statistics; nothing downloaded) and their plain forms
(``pnnh.convert.resnet_to_plain``):

- parameters as dense tensor sizes (what a file or a framework stores) and as nonzeros (the
  carrier's Dirac kernels are zeros but for one tap per channel);
- FLOPs counted as multiply-accumulates (MACs) of the Conv and Linear layers for one image at
  ``--size`` (a grouped conv counts its own weights; BatchNorm, pooling, ReLU not counted);
- CPU inference time, PyTorch (eval, no_grad) and onnxruntime (CPU provider, threads = torch's),
  batch 1 and 32, the original and the plain form timed round-robin in one loop (_util).

Run in the ecosystem environment (torchvision, timm, onnx, onnxruntime)::

    python benchmarks/plain_cost.py                 # 224x224, batch 1 and 32
    python benchmarks/plain_cost.py --counts-only   # parameters and MACs, no timing
    python benchmarks/plain_cost.py --quick         # tiny: what tests/test_benchmarks.py runs

Without torchvision/timm (the default environment) ``--quick`` times pnnh's own ``resnet18``
at a small width instead. Writes ``benchmarks/results/plain_cost[_quick].json``.
"""

from __future__ import annotations

import argparse
import io
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import machine_info, median, save_results, time_round_robin  # noqa: E402

from pnnh.convert import plain_cost, resnet_to_plain  # noqa: E402


def randomised(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BatchNorm statistics and affine (a fresh BatchNorm in eval mode is the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(0.2 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))
                m.weight.copy_(1 + 0.2 * torch.randn(n, generator=g))
                m.bias.copy_(0.2 * torch.randn(n, generator=g))
    return model.eval()


def models(quick: bool) -> dict:
    """name -> builder of the networks compared (the real libraries when installed)."""
    try:
        import timm
        import torchvision
    except ImportError:
        if not quick:
            raise SystemExit("plain_cost: needs torchvision and timm (make test-ecosystem's "
                             "environment); --quick runs without them") from None
        from pnnh import create_model
        return {"pnnh_resnet18_w8": lambda: create_model("resnet18", in_shape=(3, 32, 32),
                                                         width=8)}
    out = {"resnet18": lambda: torchvision.models.resnet18(),
           "resnet50": lambda: torchvision.models.resnet50(),
           "resnetv2_50": lambda: timm.create_model("resnetv2_50")}
    return {"resnet18": out["resnet18"]} if quick else out


def onnx_session(model: nn.Module, example: torch.Tensor):
    """An onnxruntime session of ``model`` (None when onnx/onnxruntime are missing)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), buf, dynamo=False, input_names=["input"],
                          output_names=["out"], dynamic_axes={"input": {0: "b"}, "out": {0: "b"}})
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    return ort.InferenceSession(buf.getvalue(), opts, providers=["CPUExecutionProvider"])


def measure(name: str, build, args) -> dict:
    """Counts and interleaved timings of one network and its plain form."""
    torch.manual_seed(0)
    model = randomised(build())
    plain = resnet_to_plain(model)
    size = args.size
    x1 = torch.randn(1, 3, size, size)
    with torch.no_grad():
        err = float((plain(x1) - model(x1)).abs().max())
    row = {"model": name, "size": size, "max_abs_diff": err,
           "original": plain_cost(model, x1), "plain": plain_cost(plain, x1)}
    row["times_s"] = {}
    if args.counts_only:
        return row
    sessions = {k: onnx_session(m, x1) for k, m in (("original", model), ("plain", plain))}
    for batch in args.batches:
        x = torch.randn(batch, 3, size, size)
        xn = x.numpy()
        fns = {}
        for k, m in (("original", model), ("plain", plain)):
            fns[f"torch/{k}"] = (lambda m=m, x=x: m(x))
            if sessions[k] is not None:
                fns[f"onnxruntime/{k}"] = (lambda s=sessions[k], xn=xn: s.run(None, {"input": xn}))
        with torch.no_grad():
            times = time_round_robin(fns, repeats=args.repeats)
        row["times_s"][str(batch)] = {k: median(v) for k, v in times.items()}
    return row


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes and one model (the test)")
    p.add_argument("--size", type=int, default=224, help="input height = width")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--counts-only", action="store_true",
                   help="parameters and MACs only (deterministic), no timing")
    p.add_argument("--out", type=Path, default=None, help="output folder (default results/)")
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.batches, args.repeats = 32, [1, 2], 2
    torch.set_num_threads(args.threads)
    info = machine_info()
    info["loadavg_before"] = info["loadavg_1_5_15"]
    rows = [measure(name, build, args) for name, build in models(args.quick).items()]
    info.update(machine_info())  # the load average after, beside the one before
    print(f"load average {info['loadavg_before']} -> {info['loadavg_1_5_15']}")
    for r in rows:
        o, q = r["original"], r["plain"]
        print(f"{r['model']}: params {o['params']:,} -> {q['params']:,} dense "
              f"({q['params'] / o['params']:.2f}x), {q['nonzero_params']:,} nonzero; "
              f"MACs {o['macs']:,} -> {q['macs']:,} ({q['macs'] / o['macs']:.2f}x); "
              f"max |diff| {r['max_abs_diff']:.1e}")
        for batch, t in r["times_s"].items():
            print("  batch " + batch + ": " + ", ".join(f"{k} {v * 1e3:.1f} ms"
                                                       for k, v in t.items()))
    return save_results("plain_cost", args, info, rows=rows)


if __name__ == "__main__":
    main()
