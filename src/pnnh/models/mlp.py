"""MLP families: plain, residual (ResNet), PNNH — one readable file, blocks as small modules.

Depth counts weight layers, as in the papers: a stem ``Linear(in, width)``, ``(depth - 2) / 2``
blocks of two ``Linear(width, width)`` layers each, and a classifier head ``Linear(width,
classes)``. So ``depth=8`` has 3 blocks and ``depth=102`` has 50.

- plain block:    ``y = relu(W2 relu(W1 x + b1) + b2)``
- residual block: ``y = relu(x + W2 relu(W1 x + b1) + b2)``  (He et al., post-activation)
- PNNH block:     ``y = relu([Aᵀ, -Aᵀ, D] relu([A; -A; E] x + b1) + b2)`` — two plain layers,
  a weight-shared coder ``A`` carrying ``AᵀA x`` across the ReLU (see :mod:`pnnh.coder`). With
  ``AᵀA = I`` that is ``x``: the residual block with the learner as branch (the default fixed
  coder trains in that form, at the ResNet's parameters and operations).

All weights use He (Kaiming) normal initialisation, the fair default for ReLU nets; the ResNet's
second branch layer starts at zero by default (``zero_init_residual=True``: with He init on both
branch layers and no normalisation it diverges past ~30 layers), as PNNH's learner decoder does.
"""

from __future__ import annotations

import torch
from torch import nn

from pnnh.coder import DEFAULT_CODER, CoderOptions, PNNHBlock, attach_constraint
from pnnh.models.layers import (
    StemBlocksHead,
    blocks_for_depth,
    drop_path,
    flat_dim,
    he_init_,
    set_drop_path,
)
from pnnh.registry import register_model


class PlainMLPBlock(nn.Module):
    """Two plain layers: ``relu(W2 relu(W1 x + b1) + b2)``."""

    def __init__(self, width: int):
        super().__init__()
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)
        he_init_(self.fc1)
        he_init_(self.fc2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc2(torch.relu(self.fc1(x))))

    def to_plain_layers(self) -> list[nn.Module]:
        return [self.fc1, nn.ReLU(), self.fc2, nn.ReLU()]


class ResidualMLPBlock(nn.Module):
    """Residual block with an identity shortcut: ``relu(x + W2 relu(W1 x + b1) + b2)``.

    ``branch_width`` is the hidden width of the branch (``W1: width -> branch_width``,
    ``W2: branch_width -> width``), default ``width``.
    """

    def __init__(self, width: int, zero_init_residual: bool = False,
                 branch_width: int | None = None):
        super().__init__()
        hidden = width if branch_width is None else int(branch_width)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)
        he_init_(self.fc1)
        he_init_(self.fc2)
        if zero_init_residual:
            nn.init.zeros_(self.fc2.weight)
        self.drop_path = 0.0  # stochastic depth of the branch (training only)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch = self.fc2(torch.relu(self.fc1(x)))
        return torch.relu(x + drop_path(branch, self.drop_path, self.training))


class MLP(StemBlocksHead):
    """``stem -> blocks -> head`` over the flattened input. ``blocks`` is an ``nn.Sequential``."""

    def __init__(self, in_shape, num_classes: int, width: int, blocks: list[nn.Module]):
        stem = nn.Sequential(nn.Flatten(), nn.Linear(flat_dim(in_shape), width), nn.ReLU())
        he_init_(stem[1])
        super().__init__(in_shape, stem, blocks, nn.Linear(width, num_classes))


@register_model(family="mlp", kind="plain")
def plain_mlp(in_shape=(1, 40), num_classes: int = 10, depth: int = 8, width: int = 128) -> MLP:
    """Plain ReLU MLP, no shortcuts: depth weight layers (stem + 2 per block + head)."""
    n = blocks_for_depth(depth)
    return MLP(in_shape, num_classes, width, [PlainMLPBlock(width) for _ in range(n)])


@register_model(family="mlp", kind="resnet")
def resnet_mlp(
    in_shape=(1, 40),
    num_classes: int = 10,
    depth: int = 8,
    width: int = 128,
    zero_init_residual: bool = True,
    branch_width: int | None = None,
    drop_path_rate: float = 0.0,
) -> MLP:
    """Residual MLP: identity shortcut around each block of two layers; ``branch_width`` hidden
    units in each residual branch (default ``width``); ``drop_path_rate``: stochastic depth,
    rising linearly to that rate at the last block (:func:`~pnnh.models.layers.set_drop_path`)."""
    n = blocks_for_depth(depth)
    blocks = [ResidualMLPBlock(width, zero_init_residual, branch_width) for _ in range(n)]
    set_drop_path(blocks, drop_path_rate)
    return MLP(in_shape, num_classes, width, blocks)


@register_model(family="mlp", kind="pnnh", options=CoderOptions,
                omit=("coder_kernel", "transition_norm", "transition_coder"))
def pnnh_mlp(
    in_shape=(1, 40),
    num_classes: int = 10,
    depth: int = 8,
    width: int = 128,
    learner_width: int | None = None,
    drop_path_rate: float = 0.0,
    coder: CoderOptions = DEFAULT_CODER,
) -> MLP:
    """PNNH MLP: plain blocks of a weight-shared coder (internal path) + a learner; no skips.
    ``drop_path_rate``: stochastic depth of the learner terms, as in :func:`resnet_mlp`."""
    n = blocks_for_depth(depth)
    lw = width if learner_width is None else int(learner_width)
    blocks = [PNNHBlock(width, lw, dims=0, **coder.block_kwargs()) for _ in range(n)]
    set_drop_path(blocks, drop_path_rate)
    return attach_constraint(MLP(in_shape, num_classes, width, blocks), coder)
