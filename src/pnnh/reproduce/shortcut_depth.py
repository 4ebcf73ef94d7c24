"""Paper 3, "Demystifying ResNet": why the shortcut should span two layers.

(a) **Hessian at the zero initial point versus depth** for shortcut depth ``k = 1, 2, 3``, on
    linear (``shortcut_linear``) and ReLU (``shortcut_mlp``) networks. Setting: linear
    regression, ``(1/2N) Σ ||y - f(x)||²``, with inputs whitened exactly on the sample
    (zero mean, identity covariance) and targets ``y = A x + noise``; input = width = output
    dimension ``d``; every block weight is zero and the stem/head (outside every shortcut) are
    fixed orthogonal matrices; the Hessian is the exact dense one over all block weights. The
    condition number is ``max|λ| / min|λ|`` over ``|λ| > 1e-8·max|λ|`` (the Hessian at zero is
    indefinite: a saddle). Claims: flat in depth for ``k = 2``, growing without bound for
    ``k = 1``, identically zero Hessian for ``k >= 3``. We also measure the *order* ``p`` of
    the stationary point, ``L(t v) - L(0) ∝ t^p`` along a random direction ``v``
    (``p = log2((L(2t)-L0)/(L(t)-L0))``): 1 (``k = 1``, the gradient is non-zero), 2, and 3.
(b) **Training** on MNIST-1D (cross-entropy, SGD with momentum, no normalisation) of a deep
    ReLU ``shortcut_mlp`` at one depth (weight layers) for every ``k``: small-init ``k = 2``
    versus Xavier ``k = 2``, orthogonal ``k = 2``, small-init ``k = 3`` and ``k = 1``, with
    the Hessian's extreme eigenvalues (Lanczos, on a fixed batch) tracked along training.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from pnnh.io import atomic_write_json, save_figure, write_records
from pnnh.models import count_parameters, create_model
from pnnh.probes.hessian import HessianOperator, condition_numbers, mse_loss

DESCRIPTION = ("paper 3: Hessian condition number at zero init vs depth for shortcut 1/2/3; "
               "small-init shortcut-2 training vs Xavier/orthogonal/shortcut-3")
CPU_MINUTES = 10

SCALES = {
    # test-sized: seconds, both studies and plots (``PNNH_QUICK=1``, the docs-commands test)
    "quick": {
        "dim": 4, "samples": 64, "blocks": [1, 2], "train_depth": 8, "train_width": 8,
        "steps": 20, "eval_every": 10, "hess_batch": 64, "lanczos_iters": 10,
    },
    "cpu": {
        "dim": 8, "samples": 256, "blocks": [1, 2, 4, 8, 16],
        "train_depth": 38, "train_width": 32, "steps": 1000, "eval_every": 100,
        "hess_batch": 256, "lanczos_iters": 60,
    },
    "paper": {
        "dim": 10, "samples": 1024, "blocks": [1, 2, 4, 8, 16, 32],
        "train_depth": 98, "train_width": 64, "steps": 8000, "eval_every": 250,
        "hess_batch": 1024, "lanczos_iters": 100,
    },
}

TRAIN_RUNS = [  # (label, shortcut k, init)
    ("k=2 small", 2, "small"),
    ("k=2 xavier", 2, "xavier"),
    ("k=2 orthogonal", 2, "orthogonal"),
    ("k=3 small", 3, "small"),
    ("k=1 small", 1, "small"),
]


def whitened_regression(n: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` with sample mean 0 and sample covariance exactly ``I``; ``y = A x + 0.1 ε``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.randn(
        d, d, generator=g, dtype=torch.float64)
    x = x - x.mean(0)
    evals, evecs = torch.linalg.eigh(x.T @ x / n)
    x = x @ evecs @ torch.diag(evals.rsqrt()) @ evecs.T  # ZCA
    a = torch.randn(d, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    y = x @ a.T + 0.1 * torch.randn(n, d, generator=g, dtype=torch.float64)
    return x.view(n, 1, d), y


def stationary_order(op: HessianOperator, seed: int, t: float = 1e-2) -> float:
    """``log2((L(2tv) - L0) / (L(tv) - L0))`` along a random unit ``v``: ≈ the order of the
    first non-vanishing term of the loss's Taylor expansion at the current point."""
    v = torch.randn(op.dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    v = (v / v.norm()).to(op.theta)
    x, y = next(iter(op._iter()))

    def loss(s):
        return float(op._loss(op.theta + s * v, x, y))

    l0, l1, l2 = loss(0.0), loss(t), loss(2 * t)
    if l1 == l0:
        return float("nan")
    return math.log2(abs(l2 - l0) / abs(l1 - l0))


def zero_init_study(cfg: dict, seed: int, out: Path) -> list[dict]:
    x, y = whitened_regression(cfg["samples"], cfg["dim"], seed)
    d = cfg["dim"]
    rows = []
    for model_name, variant in (("shortcut_linear", "linear"), ("shortcut_mlp", "relu")):
        for k in (1, 2, 3):
            for n in cfg["blocks"]:
                torch.manual_seed(seed)
                net = create_model(model_name, in_shape=(1, d), num_classes=d,
                                   depth=2 + n * k, width=d, shortcut=k, init="zero").double()
                op = HessianOperator(net, (x, y), mse_loss, params="blocks")
                t0 = time.perf_counter()
                lam = torch.linalg.eigvalsh(op.dense())
                cn = condition_numbers(lam, 1e-8)
                grad_norm = float(op.loss_and_grad()[1].norm())
                rows.append({
                    "variant": variant, "shortcut": k, "blocks": n, "depth": 2 + n * k,
                    "params": op.dim, "lambda_max": float(lam[-1]), "lambda_min": float(lam[0]),
                    "max_abs_eig": float(lam.abs().max()),
                    "condition_number": cn["condition_number"],
                    "condition_number_positive": cn["condition_number_positive"],
                    "num_zero": cn["num_zero"], "grad_norm": grad_norm,
                    "stationary_order": stationary_order(op, seed),
                    "seconds": time.perf_counter() - t0,
                })
                r = rows[-1]
                cns = "zero Hessian" if r["condition_number"] is None else (
                    f"cond={r['condition_number']:.6g}")
                print(f"  zero-init {variant:<6} k={k} blocks={n:<3} params={op.dim:<6} {cns:<22}"
                      f" max|λ|={r['max_abs_eig']:.3g} |grad|={grad_norm:.3g}"
                      f" order={r['stationary_order']:.2f}", flush=True)
    write_records(rows, out, "zero_init_hessian")
    return rows


def _lanczos_extremes(model, xh, yh, iters: int, seed: int) -> tuple[float, float]:
    op = HessianOperator(model, (xh, yh), "ce")
    ext = op.extreme_eigenvalues(tol=1e-3, max_iter=iters, seed=seed)
    return ext["lambda_max"], ext["lambda_min"]


def training_study(cfg: dict, seed: int, device: str, out: Path, dataset: str = "mnist1d",
                   num_samples: int | None = None) -> list[dict]:
    """(b): every ``TRAIN_RUNS`` net trained by SGD on ``dataset`` (``num_samples``: its size,
    a fixed subset of the training split for Fashion-MNIST), the loss on the whole training
    split, test accuracy and the Hessian's extremes on a fixed batch every ``eval_every``
    steps; ``training.csv``."""
    from pnnh.data import get_dataset

    train, val = get_dataset(dataset, seed=seed, num_samples=num_samples)
    xtr, ytr = train.tensors[0].to(device), train.tensors[1].to(device)
    xva, yva = val.tensors[0].to(device), val.tensors[1].to(device)
    hb = cfg["hess_batch"]
    xh, yh = xtr[:hb], ytr[:hb]
    rows = []
    for label, k, init in TRAIN_RUNS:
        torch.manual_seed(seed)
        model = create_model("shortcut_mlp", in_shape=tuple(train.input_shape),
                             num_classes=train.num_classes, depth=cfg["train_depth"],
                             width=cfg["train_width"], shortcut=k, init=init, bias=True).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        gen = torch.Generator().manual_seed(seed)
        diverged = False
        t0 = time.perf_counter()
        for step in range(cfg["steps"] + 1):
            if step % cfg["eval_every"] == 0 or step == cfg["steps"]:
                model.eval()
                with torch.no_grad():
                    tl = float(F.cross_entropy(model(xtr), ytr))
                    vout = model(xva)
                    vl = float(F.cross_entropy(vout, yva))
                    va = float((vout.argmax(1) == yva).float().mean())
                finite = math.isfinite(tl)
                lmax, lmin = (_lanczos_extremes(model, xh, yh, cfg["lanczos_iters"], seed)
                              if finite else (float("nan"), float("nan")))
                rows.append({"run": label, "shortcut": k, "init": init, "step": step,
                             "train_loss": tl, "val_loss": vl, "val_acc": va,
                             "lambda_max": lmax, "lambda_min": lmin,
                             "depth": cfg["train_depth"],
                             "params": count_parameters(model)})
                print(f"  train {label:<15} step {step:>5} train_loss {tl:.4f} val_acc {va:.3f}"
                      f" λmax {lmax:.4g} λmin {lmin:.4g}", flush=True)
                if not finite:
                    diverged = True
                    break
                model.train()
            if step == cfg["steps"]:
                break
            idx = torch.randint(0, len(xtr), (128,), generator=gen).to(device)
            loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        rows[-1]["diverged"] = diverged
        print(f"  train {label:<15} done in {time.perf_counter() - t0:.1f}s", flush=True)
    write_records(rows, out, "training")
    return rows


def _plot(zero_rows: list[dict], train_rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, variant in zip(axes, ("linear", "relu")):
        for k, style in ((1, "o-"), (2, "s-")):
            rs = [r for r in zero_rows if r["variant"] == variant and r["shortcut"] == k]
            ax.plot([r["depth"] for r in rs], [r["condition_number"] for r in rs], style,
                    label=f"shortcut {k}")
        rs = [r for r in zero_rows if r["variant"] == variant and r["shortcut"] == 3]
        ax.plot([], [], "x", label=f"shortcut 3: Hessian = 0 at all {len(rs)} depths")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xticks(sorted({r["depth"] for r in zero_rows if r["variant"] == variant}))
        ax.set_xlabel("depth (weight layers)")
        ax.set_ylabel("condition number max|λ|/min|λ| of the Hessian at 0")
        ax.set_title(f"{variant} network, zero initial point")
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, out / "zero_init_condition_number.png", dpi=120)

    plot_training(train_rows, out / "training.png")


def plot_training(train_rows: list[dict], path: Path, title: str = "") -> Path:
    """Training loss, λmax and λmin against SGD steps, one line per ``TRAIN_RUNS`` net."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for label, _, _ in TRAIN_RUNS:
        rs = [r for r in train_rows if r["run"] == label]
        steps = [r["step"] for r in rs]
        axes[0].plot(steps, [r["train_loss"] for r in rs], label=label)
        axes[1].plot(steps, [r["lambda_max"] for r in rs], label=label)
        axes[2].plot(steps, [r["lambda_min"] for r in rs], label=label)
    axes[0].set_yscale("log")
    for ax, name in zip(axes, ("training loss (full train set)", "Hessian λmax", "Hessian λmin")):
        ax.set_xlabel("SGD step")
        ax.set_ylabel(name)
        ax.legend(fontsize=8)
        if title:
            ax.set_title(title, fontsize=9)
    axes[1].set_yscale("symlog")
    axes[2].set_yscale("symlog")
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)


def run(out: Path, scale: str = "cpu", device: str = "auto", seed: int = 0) -> dict:
    from pnnh.train import pick_device

    cfg = SCALES[scale]
    dev = pick_device(device)
    out = Path(out)
    print(f"shortcut-depth ({scale}): (a) Hessian at the zero initial point", flush=True)
    zero_rows = zero_init_study(cfg, seed, out)
    print("shortcut-depth: (b) training on MNIST-1D with the Hessian tracked", flush=True)
    train_rows = training_study(cfg, seed, str(dev), out)
    _plot(zero_rows, train_rows, out)

    def cn_range(variant, k):
        c = [r["condition_number"] for r in zero_rows
             if r["variant"] == variant and r["shortcut"] == k]
        return None if any(v is None for v in c) else [min(c), max(c)]

    finals = {}
    for label, _, _ in TRAIN_RUNS:
        last = [r for r in train_rows if r["run"] == label][-1]
        finals[label] = {"step": last["step"], "train_loss": last["train_loss"],
                         "val_acc": last["val_acc"], "lambda_max": last["lambda_max"],
                         "lambda_min": last["lambda_min"], "diverged": last.get("diverged")}
    summary = {
        "zero_init": {
            f"{v}_k{k}_condition_number_range": cn_range(v, k)
            for v in ("linear", "relu") for k in (1, 2)
        },
        "zero_init_k3_max_abs_eig": max(r["max_abs_eig"] for r in zero_rows if r["shortcut"] == 3),
        "training_final": finals,
        "files": ["zero_init_hessian.csv", "training.csv", "zero_init_condition_number.png",
                  "training.png"],
    }
    atomic_write_json(out / "shortcut_depth.json", summary)
    for k, v in summary["zero_init"].items():
        print(f"  {k}: {v}")
    print(f"  k>=3 max|λ| at zero: {summary['zero_init_k3_max_abs_eig']}")
    for label, f in finals.items():
        print(f"  final {label:<15} train_loss {f['train_loss']:.4f} val_acc {f['val_acc']:.3f}")
    return summary
