"""Parameter efficiency on real images: accuracy against parameters, each family on its own knob.

    .venv/bin/python benchmarks/param_efficiency_images.py [--quick] [--seeds 3]
        [--runs DIR] [--tolerance 0.5] [--plot PNG]

The paper's "2x better parameter efficiency compared to ResNets", asked of 2-D CNNs on
Fashion-MNIST (``benchmarks/param_efficiency.py`` asks it on MNIST-1D). Two families of the
registry's CIFAR layout at depth 20 (3 stages, BatchNorm), each scaled by its *own* knob:

- ResNet (``resnet20``, the He-init ResNet): ``width``, the channels of the first stage (x2,
  x4 after), at 8, 12, 16, 24. Its parameters grow as ``width²``.
- PNNH (``pnnh20`` at width 16): ``learner_ratio``, the learner's hidden width over the block's
  width, at ¼, ½, 1, 1.5. The coder carries the whole 16/32/64-channel signal at no parameters
  (a fixed identity at ``r = 1``); only the learner ``D relu(E x)`` shrinks or grows, so a
  narrow learner keeps the full-width carry. At ratio 1 this is the ResNet-20 itself laid out
  plain (the same weights under one seed, docs/PNNH.md §6).

Training: the CPU protocol of ``pnnh reproduce image-depth`` (docs/REPRODUCTION.md, "Real
images": 10,000 training images, 3 epochs, SGD + Nesterov, lr 0.05 with warm-up and cosine,
batch 128, no augmentation), without its gradient-norm tracking; scored by test accuracy, seeds
0..``--seeds``-1, 2 threads. The table reads, per PNNH point of mean ``a``, the parameters each
family needs to reach ``a − --tolerance`` points (its smallest point whose mean does) and their
ratio ResNet / PNNH (> 1: PNNH needs fewer; the paper claims 2). Seeds run outermost, so a
study cut short has whole seeds; ``--runs DIR`` keeps every run and reuses finished ones.
Writes ``benchmarks/results/param_efficiency_images.json`` and
``docs/figures/param_efficiency_images.png``.
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
from _util import RESULTS, machine_info, save_results  # noqa: E402

from pnnh.io import save_figure  # noqa: E402
from pnnh.reproduce import image_depth  # noqa: E402
from pnnh.train import train_or_reuse  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEPTH = 20
# (kind, knob name, knob values): the ResNet's channel width, PNNH's learner ratio at width 16
KNOBS = {"resnet": ("width", (8, 12, 16, 24)), "pnnh": ("learner_ratio", (0.25, 0.5, 1.0, 1.5))}
QUICK_KNOBS = {"resnet": ("width", (8, 16)), "pnnh": ("learner_ratio", (0.5, 1.0))}


def config(kind: str, knob: float, seed: int, train: dict) -> dict:
    """One run's training config: the image-depth protocol, the family's knob set."""
    train = {k: v for k, v in train.items() if k != "track_norms"}
    size = {"width": int(knob)} if kind == "resnet" else {"width": 16,
                                                         "model_args": {"learner_ratio": knob}}
    return {**train, "model": f"{kind}{DEPTH}", **size, "device": "auto", "seed": seed,
            "progress": False}


def run_point(runs: Path, kind: str, knob: float, seeds: list[int], train: dict) -> dict:
    """Every seed of one (family, knob) point: parameters and test accuracies (%)."""
    name, _ = KNOBS[kind]
    accs, params, t0 = [], None, time.perf_counter()
    for seed in seeds:
        out = runs / f"{kind}{DEPTH}_{name}{knob:g}_seed{seed}"
        s = train_or_reuse({**config(kind, knob, seed, train), "out": str(out)})
        accs.append(100.0 * s["final_val_acc"])
        params = s["params"]
    return {"kind": kind, "knob": name, "value": knob, "params": params, "test_acc": accs,
            "mean": statistics.mean(accs), "min": min(accs), "max": max(accs),
            "seconds": round(time.perf_counter() - t0, 1)}


def match(rows: list[dict], tolerance: float) -> None:
    """Per PNNH point of mean ``a``: the parameters each family needs to reach ``a − tolerance``
    (its smallest point whose mean does) and their ratio ``P_resnet / P_pnnh``."""
    def smallest(kind: str, acc: float) -> dict | None:
        ok = [q for q in rows if q["kind"] == kind and q["mean"] >= acc]
        return min(ok, key=lambda q: q["params"]) if ok else None

    for r in rows:
        r["param_ratio"] = r["resnet_match"] = None
        if r["kind"] == "pnnh":
            res, pn = smallest("resnet", r["mean"] - tolerance), smallest("pnnh", r["mean"] - tolerance)
            if res:
                r["resnet_match"], r["param_ratio"] = res["value"], res["params"] / pn["params"]


def table(rows: list[dict]) -> str:
    lines = ["| family | knob | params | test acc % mean [min, max] | "
             "ResNet / PNNH params to reach its acc − tol |", "|---|---|---|---|---|"]
    for r in rows:
        ratio = ("" if r["kind"] != "pnnh" else
                 f"{r['param_ratio']:.2f} (ResNet width {r['resnet_match']})"
                 if r["param_ratio"] else "no ResNet point reaches it")
        lines.append(f"| {'ResNet' if r['kind'] == 'resnet' else 'PNNH'}-{DEPTH} | "
                     f"{r['knob']} {r['value']:g} | {r['params']:,} | {r['mean']:.2f} "
                     f"[{r['min']:.2f}, {r['max']:.2f}] | {ratio} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> Path:
    """Test accuracy (mean, min–max over seeds) against parameters (log x), one line a family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for kind, style, label in (("resnet", "o-", "ResNet-20, channel width"),
                               ("pnnh", "s--", "PNNH-20 (width 16), learner ratio")):
        pts = sorted((r for r in rows if r["kind"] == kind), key=lambda r: r["params"])
        if not pts:
            continue
        ax.errorbar([r["params"] for r in pts], [r["mean"] for r in pts],
                    yerr=[[r["mean"] - r["min"] for r in pts], [r["max"] - r["mean"] for r in pts]],
                    fmt=style, capsize=3, label=label)
        for r in pts:
            ax.annotate(f"{r['value']:g}", (r["params"], r["mean"]), fontsize=7,
                        textcoords="offset points", xytext=(4, -10 if kind == "pnnh" else 4))
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--tolerance", type=float, default=0.5, help="accuracy points")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=Path, default=None, help="keep and reuse run directories here")
    p.add_argument("--out", type=Path, default=None, help="results directory")
    p.add_argument("--plot", type=Path, default=None,
                   help="PNG path (default docs/figures/param_efficiency_images.png; --quick: "
                        "in --out)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: two knobs a family, the image-depth quick protocol, 1 seed")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    knobs, train = (QUICK_KNOBS, image_depth.QUICK["train"]) if args.quick else \
        (KNOBS, image_depth.CPU["train"])
    seeds = list(range(1 if args.quick else args.seeds))
    torch.set_num_threads(args.threads)
    info = machine_info()
    with tempfile.TemporaryDirectory() as tmp:
        runs = args.runs or Path(tmp)
        for i in range(len(seeds)):  # seeds outermost: a study cut short has whole seeds
            rows = [run_point(runs, kind, v, seeds[: i + 1], train)
                    for kind, (_, values) in knobs.items() for v in values]
            print(f"seeds 0..{i}: " + ", ".join(f"{r['kind']} {r['value']:g} {r['mean']:.2f}"
                                                for r in rows), flush=True)
    match(rows, args.tolerance)
    print(f"Fashion-MNIST, image-depth {'quick' if args.quick else 'CPU'} protocol, "
          f"{len(seeds)} seed(s), torch {info['torch']}, threads {torch.get_num_threads()}")
    print(table(rows))
    png = args.plot or ((args.out or RESULTS) / "param_efficiency_images_quick.png" if args.quick
                        else ROOT / "docs" / "figures" / "param_efficiency_images.png")
    title = f"Fashion-MNIST, depth {DEPTH}, {len(seeds)} seed(s) (min–max bars)"
    print(f"wrote {plot(rows, png, title)}")
    ratios = [r["param_ratio"] for r in rows if r["param_ratio"]]
    return save_results("param_efficiency_images", args, info, results=rows, table=table(rows),
                        plot=str(png), max_param_ratio=max(ratios) if ratios else None)


if __name__ == "__main__":
    main()
