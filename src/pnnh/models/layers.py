"""Building blocks every model family shares (as ``timm.layers``): init helpers, conv helpers,
depth arithmetic and the one container, :class:`StemBlocksHead`.

A family file (``models/mlp.py``, ``models/cifar.py``, ...) takes these from here rather than
from another family, so that each family depends on this module and :mod:`pnnh.coder` only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from pnnh.coder import drop_path as drop_path  # re-exported for the families
from pnnh.coder import fold_bn
from pnnh.errors import ConfigError


def blocks_for_depth(depth: int, layers_per_block: int = 2) -> int:
    """Number of blocks for ``depth`` weight layers (stem + blocks + head)."""
    depth = int(depth)
    if depth < 2 or (depth - 2) % layers_per_block:
        raise ValueError(
            f"depth must be 2 + {layers_per_block}*k (stem + k blocks of {layers_per_block} "
            f"layers + head), got depth={depth}"
        )
    return (depth - 2) // layers_per_block


def flat_dim(in_shape) -> int:
    """Number of input features once flattened: ``prod(in_shape)``."""
    return int(math.prod(in_shape))


def he_init_(layer: nn.Linear | nn.Conv1d | nn.Conv2d) -> None:
    """He (Kaiming) normal weights, ``Var w = 2 / fan_in``, and zero bias: the ReLU default."""
    nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    """A 3x3 convolution, padding 1, no bias (a BatchNorm follows)."""
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def init_conv_bn_(module: nn.Module) -> None:
    """He normal (``fan_out``) on every ``Conv2d`` of ``module``; BatchNorm at ``γ = 1, β = 0``."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """``bn(conv(x))`` as one conv with a bias (eval statistics)."""
    w, b = fold_bn(conv.weight, conv.bias, bn)
    out = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                    conv.padding, bias=True)
    with torch.no_grad():
        out.weight.copy_(w)
        out.bias.copy_(b)
    return out


def set_drop_path(blocks: Sequence[nn.Module], rate: float) -> None:
    """Stochastic depth over ``blocks``, rising linearly with depth from 0 at the first block
    to ``rate`` at the last (the linear decay rule of Huang et al.; timm's ``drop_path_rate``):
    block ``i`` of ``n`` drops its branch with probability ``rate · i / (n - 1)``."""
    if not 0.0 <= float(rate) < 1.0:
        raise ConfigError(f"drop_path_rate: must be in [0, 1), got {rate!r}",
                          field="drop_path_rate")
    n = len(blocks)
    for i, b in enumerate(blocks):
        b.drop_path = float(rate) * i / (n - 1) if n > 1 else float(rate)


class StemBlocksHead(nn.Module):
    """``head(blocks(stem(x)))``: the one container of every family.

    ``blocks`` becomes an ``nn.Sequential``; ``in_shape`` (the input shape without the batch
    dimension) is kept so that probes and export can build an example input. The state-dict
    keys are ``stem.*``, ``blocks.<i>.*``, ``head.*``. A family subclasses it only to build
    its stem and head; build them in the order the random numbers should be drawn.
    """

    def __init__(self, in_shape, stem: nn.Module, blocks: list[nn.Module], head: nn.Module):
        super().__init__()
        self.in_shape = tuple(in_shape)
        self.stem = stem
        self.blocks = nn.Sequential(*blocks)
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))
