"""1-D CNN families for MNIST-1D (input ``(1, 40)``): plain, residual (ResNet), PNNH.

Depth counts weight layers: a stem ``Conv1d(C_in, width, 3)``, ``(depth - 2) / 2`` blocks of
two ``Conv1d(width, width, 3)`` layers (padding 1, stride 1: the length is kept), and a
head ``Linear(width · L, classes)`` on the flattened features (MNIST-1D is positional, so the
head keeps positions rather than average-pooling them away). No normalization, as in the
MLP study.

- plain block:    ``y = relu(conv2(relu(conv1(x))))``
- residual block: ``y = relu(x + conv2(relu(conv1(x))))`` (``conv2`` starts at zero by default,
  ``zero_init_residual=True``; ``False`` gives the He-init ResNet)
- PNNH block:     ``y = relu(AᵀA x + conv_D(relu(conv_E(x))) + b)`` — a pointwise weight-shared
  coder beside a 3-tap learner; as plain layers, one 3-tap conv ``[A; -A; E]`` and one
  ``[Aᵀ, -Aᵀ, D]`` (see :mod:`pnnh.coder`).
"""

from __future__ import annotations

import torch
from torch import nn

from pnnh.coder import DEFAULT_CODER, CoderOptions, PNNHBlock, attach_constraint
from pnnh.models.layers import (
    StemBlocksHead,
    blocks_for_depth,
    drop_path,
    he_init_,
    set_drop_path,
)
from pnnh.registry import register_model


class PlainBlock1d(nn.Module):
    """Two plain conv layers: ``relu(conv2(relu(conv1(x))))``."""

    def __init__(self, width: int, kernel_size: int = 3):
        super().__init__()
        self.conv1 = nn.Conv1d(width, width, kernel_size, padding=kernel_size // 2)
        self.conv2 = nn.Conv1d(width, width, kernel_size, padding=kernel_size // 2)
        he_init_(self.conv1)
        he_init_(self.conv2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv2(torch.relu(self.conv1(x))))

    def to_plain_layers(self) -> list[nn.Module]:
        return [self.conv1, nn.ReLU(), self.conv2, nn.ReLU()]


class ResidualBlock1d(nn.Module):
    """``relu(x + conv2(relu(conv1(x))))`` (identity shortcut, post-activation); the branch has
    ``branch_width`` hidden channels (default ``width``)."""

    def __init__(self, width: int, kernel_size: int = 3, zero_init_residual: bool = False,
                 branch_width: int | None = None):
        super().__init__()
        hidden = width if branch_width is None else int(branch_width)
        self.conv1 = nn.Conv1d(width, hidden, kernel_size, padding=kernel_size // 2)
        self.conv2 = nn.Conv1d(hidden, width, kernel_size, padding=kernel_size // 2)
        he_init_(self.conv1)
        he_init_(self.conv2)
        if zero_init_residual:
            nn.init.zeros_(self.conv2.weight)
        self.drop_path = 0.0  # stochastic depth of the branch (training only)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch = self.conv2(torch.relu(self.conv1(x)))
        return torch.relu(x + drop_path(branch, self.drop_path, self.training))


class CNN1d(StemBlocksHead):
    """``stem -> blocks -> head``; ``blocks`` is an ``nn.Sequential``."""

    def __init__(self, in_shape, num_classes: int, width: int, blocks: list[nn.Module],
                 kernel_size: int = 3):
        if len(in_shape) != 2:
            raise ValueError(f"1-D CNNs take inputs (channels, length), got in_shape={in_shape}")
        c, length = tuple(in_shape)
        stem = nn.Sequential(nn.Conv1d(c, width, kernel_size, padding=kernel_size // 2), nn.ReLU())
        he_init_(stem[0])
        head = nn.Sequential(nn.Flatten(), nn.Linear(width * length, num_classes))
        super().__init__(in_shape, stem, blocks, head)


@register_model(family="cnn1d", kind="plain")
def plain_cnn1d(in_shape=(1, 40), num_classes: int = 10, depth: int = 8, width: int = 32) -> CNN1d:
    """Plain 1-D CNN, no shortcuts: depth conv/linear layers (stem + 2 per block + head)."""
    n = blocks_for_depth(depth)
    return CNN1d(in_shape, num_classes, width, [PlainBlock1d(width) for _ in range(n)])


@register_model(family="cnn1d", kind="resnet")
def resnet_cnn1d(
    in_shape=(1, 40), num_classes: int = 10, depth: int = 8, width: int = 32,
    zero_init_residual: bool = True, branch_width: int | None = None,
    drop_path_rate: float = 0.0,
) -> CNN1d:
    """Residual 1-D CNN: identity shortcut around each block of two convs; ``branch_width``
    hidden channels in each residual branch (default ``width``); ``drop_path_rate``:
    stochastic depth (:func:`~pnnh.models.layers.set_drop_path`)."""
    n = blocks_for_depth(depth)
    blocks = [ResidualBlock1d(width, zero_init_residual=zero_init_residual,
                              branch_width=branch_width) for _ in range(n)]
    set_drop_path(blocks, drop_path_rate)
    return CNN1d(in_shape, num_classes, width, blocks)


@register_model(family="cnn1d", kind="pnnh", options=CoderOptions,
                omit=("transition_norm", "transition_coder"))
def pnnh_cnn1d(
    in_shape=(1, 40),
    num_classes: int = 10,
    depth: int = 8,
    width: int = 32,
    learner_width: int | None = None,
    drop_path_rate: float = 0.0,
    coder: CoderOptions = DEFAULT_CODER,
) -> CNN1d:
    """PNNH 1-D CNN: plain blocks of a weight-shared coder + a 3-tap learner; no skips.
    ``drop_path_rate``: stochastic depth of the learner terms, as in :func:`resnet_cnn1d`."""
    n = blocks_for_depth(depth)
    lw = width if learner_width is None else int(learner_width)
    blocks = [PNNHBlock(width, lw, dims=1, kernel_size=3, **coder.block_kwargs())
              for _ in range(n)]
    set_drop_path(blocks, drop_path_rate)
    return attach_constraint(CNN1d(in_shape, num_classes, width, blocks), coder)
