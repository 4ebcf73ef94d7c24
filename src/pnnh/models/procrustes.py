"""Procrustes ResNets (paper 2): ResNets whose transition blocks are norm-preserving.

A transition block changes the representation's dimensions; its shortcut cannot be the
identity, so the block is where norm preservation breaks. The Procrustes variant projects the
weights of every block marked ``transition = True`` onto matrices with equal singular values
after each optimizer step, and ZCA-whitens the classifier's input (see
:mod:`pnnh.norm_preservation` for the math and which matrix of a convolution is projected).

- ``procrustes_resnet20/56/110``: the CIFAR ResNets of :mod:`pnnh.models.cifar` (their
  transition blocks: strided ``conv1``, ``conv2``, projection ``shortcut``), made
  norm-preserving with :func:`pnnh.norm_preservation.make_norm_preserving`.
- ``procrustes_resnet_mlp``: an MLP ResNet whose width grows across stages (by default
  ``width/4 → width/2 → width``), so that it has transition blocks, like the CIFAR ResNets'
  channel doubling. A transition block is ``relu(P x + W2 relu(W1 x + b1) + b2)`` with a
  linear projection shortcut ``P`` (``w_out × w_in``, no bias); the other blocks are the
  identity-shortcut blocks of :mod:`pnnh.models.mlp`. With ``procrustes=False, zca=False``
  it is the plain staged ResNet, the baseline. The last layer of every residual branch starts
  at zero (``zero_init_residual=True``, Goyal et al.): without normalization, He-initialised
  residual branches double the activations' variance per block and a 34-layer net does not
  train on MNIST-1D (see docs/NORM_PRESERVATION.md). At initialisation every identity block is
  then exactly norm-preserving and the transitions are the only blocks that are not — the
  setting paper 2's construction addresses.

``procrustes`` and ``zca`` are options of every factory here (``--procrustes`` / ``--zca``, or
``--model-arg procrustes=false`` to switch one off).
"""

from __future__ import annotations

import torch
from torch import nn

from pnnh.models.factory import create_model
from pnnh.models.layers import (
    StemBlocksHead,
    blocks_for_depth,
    drop_path,
    flat_dim,
    he_init_,
    set_drop_path,
)
from pnnh.models.mlp import ResidualMLPBlock
from pnnh.norm_preservation import make_norm_preserving
from pnnh.registry import register_model


class TransitionMLPBlock(nn.Module):
    """Width change ``w_in → w_out``: ``relu(P x + W2 relu(W1 x + b1) + b2)``."""

    transition = True

    def __init__(self, w_in: int, w_out: int, zero_init_residual: bool = False):
        super().__init__()
        self.fc1 = nn.Linear(w_in, w_out)
        self.fc2 = nn.Linear(w_out, w_out)
        self.shortcut = nn.Linear(w_in, w_out, bias=False)
        he_init_(self.fc1)
        he_init_(self.fc2)
        nn.init.kaiming_normal_(self.shortcut.weight, nonlinearity="linear")
        if zero_init_residual:
            nn.init.zeros_(self.fc2.weight)
        self.drop_path = 0.0  # stochastic depth of the branch (training only)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch = self.fc2(torch.relu(self.fc1(x)))
        return torch.relu(self.shortcut(x) + drop_path(branch, self.drop_path, self.training))


def stage_widths(width: int, stages: int) -> list[int]:
    """``[width/2^(S-1), ..., width/2, width]`` (each at least 1)."""
    return [max(1, width // 2 ** (stages - 1 - i)) for i in range(stages)]


class StagedResNetMLP(StemBlocksHead):
    """``stem -> blocks -> head``; ``blocks`` holds ``stages`` stages, each but the first
    opening with a :class:`TransitionMLPBlock`."""

    def __init__(self, in_shape, num_classes: int, depth: int, width: int, stages: int,
                 zero_init_residual: bool = True, drop_path_rate: float = 0.0):
        n = blocks_for_depth(depth)
        if stages < 1:
            raise ValueError(f"stages must be at least 1, got {stages}")
        stages = min(stages, max(n, 1))
        widths = stage_widths(width, stages)
        per_stage = [n // stages + (1 if i < n % stages else 0) for i in range(stages)]
        stem = nn.Sequential(nn.Flatten(), nn.Linear(flat_dim(in_shape), widths[0]), nn.ReLU())
        he_init_(stem[1])
        blocks: list[nn.Module] = []
        for i, (w, k) in enumerate(zip(widths, per_stage)):
            for j in range(k):
                if j == 0 and i > 0:
                    blocks.append(TransitionMLPBlock(widths[i - 1], w, zero_init_residual))
                else:
                    blocks.append(ResidualMLPBlock(w, zero_init_residual))
        set_drop_path(blocks, drop_path_rate)
        super().__init__(in_shape, stem, blocks, nn.Linear(widths[-1], num_classes))
        self.widths = widths


@register_model(family="procrustes", kind="resnet")
def procrustes_resnet_mlp(
    in_shape=(1, 40),
    num_classes: int = 10,
    depth: int = 20,
    width: int = 128,
    stages: int = 3,
    zero_init_residual: bool = True,
    procrustes: bool = True,
    zca: bool = True,
    drop_path_rate: float = 0.0,
) -> nn.Module:
    """Staged ResNet MLP (width/4 → width/2 → width), Procrustes transitions + ZCA head;
    ``drop_path_rate``: stochastic depth of every block's branch (the shortcuts stay)."""
    model = StagedResNetMLP(in_shape, num_classes, depth, width, stages, zero_init_residual,
                            drop_path_rate)
    if procrustes or zca:
        make_norm_preserving(model, procrustes=procrustes, zca=zca)
    return model


def _procrustes_cifar(depth: int, in_shape, num_classes, procrustes, zca, **kwargs) -> nn.Module:
    model = create_model(f"resnet{depth}", in_shape=in_shape, num_classes=num_classes, **kwargs)
    if procrustes or zca:
        make_norm_preserving(model, procrustes=procrustes, zca=zca)
    return model


@register_model(family="procrustes", kind="resnet")
def procrustes_resnet20(
    in_shape=(3, 32, 32), num_classes: int = 10, procrustes: bool = True, zca: bool = True, **kw
) -> nn.Module:
    """CIFAR ResNet-20 with Procrustes transition blocks and a ZCA-whitened classifier input."""
    return _procrustes_cifar(20, in_shape, num_classes, procrustes, zca, **kw)


@register_model(family="procrustes", kind="resnet")
def procrustes_resnet56(
    in_shape=(3, 32, 32), num_classes: int = 10, procrustes: bool = True, zca: bool = True, **kw
) -> nn.Module:
    """CIFAR ResNet-56 with Procrustes transition blocks and a ZCA-whitened classifier input."""
    return _procrustes_cifar(56, in_shape, num_classes, procrustes, zca, **kw)


@register_model(family="procrustes", kind="resnet")
def procrustes_resnet110(
    in_shape=(3, 32, 32), num_classes: int = 10, procrustes: bool = True, zca: bool = True, **kw
) -> nn.Module:
    """CIFAR ResNet-110 with Procrustes transition blocks and a ZCA-whitened classifier input."""
    return _procrustes_cifar(110, in_shape, num_classes, procrustes, zca, **kw)
