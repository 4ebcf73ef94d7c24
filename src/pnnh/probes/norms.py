"""Gradient-norm preservation per block (paper 2: "Norm-Preservation", Zaeemzadeh et al.).

For a block ``x_out = F(x_in)`` inside a network with loss ``L``, back-propagation gives

    ∂L/∂x_in = J_Fᵀ ∂L/∂x_out,    J_F = ∂x_out/∂x_in,

and the block is *norm-preserving* when ``‖∂L/∂x_in‖ ≈ ‖∂L/∂x_out‖``, i.e. when

    ratio = ‖∂L/∂x_in‖ / ‖∂L/∂x_out‖ ≈ 1.

Paper 2 shows that an identity skip ``x_out = x_in + F(x_in)`` pushes the ratio towards 1 (all
singular values of ``I + J_F`` near 1 when ``J_F`` is small) and that stacking more blocks makes
each block's ``J_F`` smaller, hence the network more norm-preserving. A plain block has no such
guarantee: a ReLU layer alone zeroes about half of the gradient's coordinates.

Norms are Frobenius norms over the whole batch tensor (the gradient of the batch loss with
respect to the block's batch input/output). Block inputs and outputs are captured with forward
hooks and their gradients computed with ``torch.autograd.grad``, so the parameters' ``.grad``
are never touched. Blocks must not modify their *input* tensor in place.

- :func:`norms` — one measurement on a batch;
- :class:`NormTracker` — the training callback behind ``pnnh train --track-norms N``
  (writes ``norms.jsonl`` in the run directory);
- ``pnnh probe norms`` — ``norms.csv`` / ``norms.json`` / ``norms.png``.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from pnnh.errors import ConfigError
from pnnh.io import append_jsonl, save_figure
from pnnh.probes.common import (
    ProbeResult,
    ProbeTarget,
    cross_entropy,
    find_blocks,
    first_tensor,
    select_output,
    unwrap,
)

NAME = "norms"
DESCRIPTION = "gradient-norm ratio ||dL/dx_in|| / ||dL/dx_out|| per block"

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
BlockSpec = Sequence[str] | Mapping[str, nn.Module] | None

CSV_COLUMNS = ["block", "grad_in_norm", "grad_out_norm", "ratio"]


def resolve_blocks(model: nn.Module, blocks: BlockSpec = None) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` pairs to measure.

    ``None``: the blocks :func:`pnnh.plainness.find_blocks` finds (``blocks.0``, ...,
    ``layer1.0``, ..., ``encoder.layer.0``, ...);
    a sequence of names: those submodules (``model.get_submodule(name)``);
    a mapping: its ``label -> module`` items.
    """
    if blocks is None:
        return find_blocks(model)
    if isinstance(blocks, Mapping):
        return list(blocks.items())
    out = []
    for name in blocks:
        try:
            out.append((name, model.get_submodule(name)))
        except AttributeError:
            raise ConfigError(f"norms: model has no submodule {name!r}", field="blocks") from None
    return out


def norms(
    model: nn.Module,
    batch: tuple[torch.Tensor, torch.Tensor],
    loss_fn: LossFn | None = None,
    blocks: BlockSpec = None,
    output: str | int | None = None,
) -> list[dict]:
    """Per block: ``grad_in_norm`` ‖∂L/∂x_in‖, ``grad_out_norm`` ‖∂L/∂x_out‖ and their ``ratio``.

    ``batch`` is ``(inputs, targets)``; ``loss_fn(outputs, targets)`` defaults to cross-entropy
    (:func:`~pnnh.probes.common.cross_entropy`: per token for ``(batch, tokens, vocab)``
    logits). A model returning a ``ModelOutput``, dict or tuple is measured on
    ``select_output(out, output)`` (``logits`` by default). Token-id inputs work as they are:
    the blocks' inputs and outputs are vectors.
    The model is run in whatever mode it is in (eval for a probe, train inside training).
    Returns one record per block, in forward order: ``{index, block, grad_in_norm,
    grad_out_norm, ratio}``; a module that runs ``k`` times per forward pass (a shared
    ``nn.ReLU``) gives ``k`` records, ``name``, ``name@1``, ... Nothing is accumulated into the
    parameters' ``.grad``.
    """
    loss_fn = loss_fn or cross_entropy
    inputs, targets = batch
    model = unwrap(model)
    named = resolve_blocks(model, blocks)
    captured: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def make_hook(i: int):
        def hook(module, args, output):
            x_in, x_out = first_tensor(args), first_tensor(output)
            if x_in is not None and x_out is not None:
                captured.setdefault(i, []).append((x_in, x_out))

        return hook

    handles = [m.register_forward_hook(make_hook(i)) for i, (_, m) in enumerate(named)]
    try:
        with torch.enable_grad():
            # The input requires grad so that a first block fed straight from the data is measured.
            x = inputs.detach().requires_grad_(inputs.is_floating_point())
            loss = loss_fn(select_output(model(x), output), targets)
            order = sorted(captured)
            tensors = [t for i in order for pair in captured[i] for t in pair]
            wanted = [t for t in tensors if t.requires_grad]
            grads = torch.autograd.grad(loss, wanted, allow_unused=True) if wanted else []
    finally:
        for h in handles:
            h.remove()
    grad_of = {id(t): g for t, g in zip(wanted, grads)}

    def norm(t: torch.Tensor) -> float:
        g = grad_of.get(id(t))
        return float("nan") if g is None else float(torch.linalg.vector_norm(g.double()))

    records = []
    for i, (name, _) in enumerate(named):
        for call, (x_in, x_out) in enumerate(captured.get(i, [(None, None)])):
            gi = go = float("nan")
            if x_in is not None:
                gi, go = norm(x_in), norm(x_out)
            ratio = gi / go if go > 0 else float("nan")
            records.append({"index": len(records), "block": name if call == 0 else f"{name}@{call}",
                            "grad_in_norm": gi, "grad_out_norm": go, "ratio": ratio})
    return records


def _buffers_snapshot(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(b, b.detach().clone()) for b in model.buffers()]


class NormTracker:
    """Training callback: every ``every`` steps, measure :func:`norms` on the current batch.

    ``path`` is the run directory (records go to ``path/norms.jsonl``) or a ``.jsonl`` file.
    Each record is ``{step, epoch, block, grad_in_norm, grad_out_norm, ratio}``, appended with
    :func:`pnnh.io.append_jsonl`. The measurement is side-effect free for training: it uses its
    own forward/backward through ``torch.autograd.grad`` (parameters' ``.grad`` untouched),
    restores every buffer (BatchNorm / ZCA running statistics) and the RNG state (dropout).
    """

    def __init__(self, every: int, path: str | Path, blocks: BlockSpec = None):
        if int(every) < 1:
            raise ConfigError(f"track_norms: must be >= 1, got {every!r}", field="track_norms")
        self.every = int(every)
        path = Path(path)
        self.path = path if path.suffix == ".jsonl" else path / "norms.jsonl"
        self.blocks = blocks
        self.records: list[dict] = []

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def on_step(
        self,
        step: int,
        epoch: int,
        model: nn.Module,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        loss_fn: LossFn | None = None,
    ) -> list[dict]:
        if not self.due(step):
            return []
        saved = _buffers_snapshot(model)
        devices = [inputs.device.index or 0] if inputs.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):
                measured = norms(model, (inputs, targets), loss_fn, self.blocks)
        finally:
            with torch.no_grad():
                for b, copy in saved:
                    b.copy_(copy)
        out = []
        for r in measured:
            rec = {"step": int(step), "epoch": int(epoch), "block": r["block"]}
            rec.update({k: r[k] for k in ("grad_in_norm", "grad_out_norm", "ratio")})
            append_jsonl(self.path, rec)
            out.append(rec)
        self.records.extend(out)
        return out


def summarize(records: Sequence[dict]) -> dict:
    """Mean ratio and mean |log ratio| (0 for a perfectly norm-preserving network)."""
    ratios = [r["ratio"] for r in records if r["ratio"] is not None and math.isfinite(r["ratio"])]
    logs = [abs(math.log(x)) for x in ratios if x > 0]
    return {
        "blocks": len(records),
        "mean_ratio": sum(ratios) / len(ratios) if ratios else float("nan"),
        "mean_abs_log_ratio": sum(logs) / len(logs) if logs else float("nan"),
    }


def plot(
    records: Sequence[dict], path: str | Path, title: str = "Gradient-norm ratio per block"
) -> Path:
    """Ratio per block (log scale), one line per ``model`` (records without it form one line)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(str(r.get("model", "model")), []).append(r)
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for label, rs in groups.items():
        xs = [r.get("index", i) for i, r in enumerate(rs)]
        ys = [r["ratio"] if r["ratio"] is not None else float("nan") for r in rs]
        ax.plot(xs, ys, marker="o", markersize=3, label=label)
    ax.axhline(1.0, color="gray", linestyle="--", linewidth=1, label="norm-preserving (1)")
    if all(r["ratio"] and r["ratio"] > 0 for r in records):
        ax.set_yscale("log")
    ax.set_xlabel("block index")
    ax.set_ylabel("‖∂L/∂x_in‖ / ‖∂L/∂x_out‖")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--blocks",
        help="comma-separated submodule names to measure (default: the blocks found in "
        "the common layouts, see docs/PROBES.md)",
    )


def run(targets: Sequence[ProbeTarget], args: argparse.Namespace, out: Path) -> ProbeResult:
    """:func:`norms` of every target: records (with a ``model`` column when several), the
    ratio plot ``norms.png`` and one summary line per model."""
    blocks = [b.strip() for b in args.blocks.split(",") if b.strip()] if args.blocks else None
    several = len(targets) > 1
    records = []
    for t in targets:
        for r in norms(t.model, (t.inputs, t.targets), blocks=blocks,
                       output=getattr(args, "output", None)):
            records.append({"model": t.label, **r} if several else r)
    figure = plot(records, out / "norms.png")
    notes = []
    for t in targets:
        mine = [r for r in records if not several or r["model"] == t.label]
        s = summarize(mine)
        notes.append(f"{t.label}: {s['blocks']} blocks, mean ratio {s['mean_ratio']:.4f}, "
                     f"mean |log ratio| {s['mean_abs_log_ratio']:.4f}")
        if mine and all(r["grad_out_norm"] == 0 for r in mine):
            notes.append(f"{t.label}: every block's output gradient is 0, so the ratios are "
                         "undefined (a zero-initialised head, as torchvision's ViT has, passes "
                         "no gradient back at init)")
    notes.append(f"norms: {out / 'norms.csv'}")
    columns = (["model"] if several else []) + CSV_COLUMNS
    return ProbeResult(records, columns, notes, [figure])
