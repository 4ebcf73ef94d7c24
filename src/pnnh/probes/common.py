"""What every probe command needs: models (fresh or from a checkpoint) and a fixed batch."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
from torch import nn

from pnnh.checkpoint import load_model
from pnnh.data import get_dataset
from pnnh.device import pick_device
from pnnh.errors import ConfigError
from pnnh.registry import create_model


@dataclass
class ProbeTarget:
    label: str  # what plots and tables call this model
    model: nn.Module  # in eval mode, on the requested device
    inputs: torch.Tensor
    targets: torch.Tensor


def probe_batch(dataset: str, data_dir: str | None, num_samples: int, seed: int = 0):
    """``num_samples`` validation samples drawn with a seeded generator: ``(inputs, targets, ds)``."""
    if num_samples < 2:
        raise ConfigError(f"num_samples: need at least 2, got {num_samples}", field="num_samples")
    _, val = get_dataset(dataset, data_dir, seed=seed)
    idx = torch.randperm(len(val), generator=torch.Generator().manual_seed(seed))[:num_samples]
    if hasattr(val, "tensors"):
        x, y = val.tensors[0][idx], val.tensors[1][idx]
    else:
        items = [val[i] for i in idx.tolist()]
        x = torch.stack([it[0] for it in items])
        y = torch.tensor([int(it[1]) for it in items])
    return x, y, val


def probe_targets(args: argparse.Namespace) -> list[ProbeTarget]:
    """Resolve ``--checkpoint`` or ``--model`` (repeatable) plus the batch options into targets."""
    device = pick_device(getattr(args, "device", "cpu") or "cpu")
    model_args = dict(getattr(args, "model_args", {}) or {})
    seed = getattr(args, "seed", 0) or 0
    if getattr(args, "checkpoint", None):
        model, ckpt = load_model(args.checkpoint, map_location="cpu")
        dataset = args.dataset or ckpt.get("config", {}).get("dataset") or "mnist1d"
        data_dir = args.data_dir or ckpt.get("config", {}).get("data_dir")
        x, y, _ = probe_batch(dataset, data_dir, args.num_samples, seed)
        label = f"{ckpt['model_name']} (epoch {ckpt.get('epoch')})"
        return [ProbeTarget(label, model.to(device).eval(), x.to(device), y.to(device))]
    x, y, val = probe_batch(args.dataset or "mnist1d", args.data_dir, args.num_samples, seed)
    targets = []
    names = args.model if isinstance(args.model, list) else [args.model]
    for name in names:
        torch.manual_seed(seed)
        model = create_model(name, in_shape=tuple(val.input_shape), num_classes=val.num_classes,
                             depth=args.depth, width=args.width, **model_args)
        label = name if args.depth is None else f"{name}-{args.depth}"
        targets.append(ProbeTarget(label, model.to(device).eval(), x.to(device), y.to(device)))
    return targets
