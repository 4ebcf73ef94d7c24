"""Shortcut-depth networks of "Demystifying ResNet" (Li, Jiao, Han, Weissman; arXiv:1611.01186).

A network is ``stem -> blocks -> head``. Each block holds ``k`` weight layers (the *shortcut
depth*) with an identity shortcut around them; ``k = 0`` means no shortcut at all (one plain
layer per block)::

    linear:  x_{l+1} =      x_l + W_k ··· W_2 W_1 x_l                    (k >= 1)
    relu:    x_{l+1} = φ( x_l + W_k φ(··· φ(W_2 φ(W_1 x_l))) )           (post-activation)
    k = 0:   x_{l+1} = W x_l  (linear)   or   φ(W x_l)  (relu)

``depth`` counts weight layers: the stem ``Linear(in, width)`` and head ``Linear(width,
classes)`` sit outside every shortcut, so ``depth = 2 + n·k`` for ``n`` blocks (``2 + n`` for
``k = 0``).

Why ``k`` matters at the zero initial point (all block weights zero): the network output is a
polynomial in the block weights whose lowest-order terms have degree ``k``. For ``k = 2`` the
loss's second-order term is ``Σ_blocks tr(W_2 W_1 C)`` for one data matrix ``C`` — the Hessian is
block diagonal with the *same* block for every residual unit, so its condition number does not
depend on the depth. For ``k = 1`` the blocks couple (``(1 1ᵀ) ⊗ ·`` structure) and the condition
number grows with depth; for ``k >= 3`` there is no second-order term: the Hessian is zero.

ReLU convention: ``φ(z) = max(z, 0)`` with derivative 1 at ``z = 0`` (the right derivative,
``clamp_min``), rather than PyTorch's ``relu`` with derivative 0 there. The two agree except at
exactly zero pre-activations, i.e. at the zero initial point itself, where ReLU is not
differentiable; with this convention the Hessian "at zero" is the limit from positive
pre-activations. The stem is followed by ``φ`` too, so block inputs are non-negative and every
post-activation ``φ`` is the identity on the zero-init network.

Initialisations (``init``): ``zero`` (block weights 0), ``small`` (block weights
``N(0, s²/fan_in)``, ``s = scale``), ``xavier`` (Glorot normal, every layer), ``orthogonal``
(every layer). With ``zero``/``small`` the stem and head — which are outside every shortcut
and would otherwise make the whole network zero — are (semi-)orthogonal. Biases, if any, are 0.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pnnh.registry import register_model

INITS = ("zero", "small", "xavier", "orthogonal")


def relu0(z: torch.Tensor) -> torch.Tensor:
    """``max(z, 0)`` with derivative 1 at 0: a zero-initialised net's pre-activations are exactly
    0, and the analysis takes the ReLU as the identity there. Written as a selection, whose
    gradient goes to the chosen branch by definition; ``clamp_min``'s gradient at the boundary
    is an implementation detail (1 in torch 2.13, 0 in 2.14)."""
    return torch.where(z >= 0, z, 0.0)


class ShortcutBlock(nn.Module):
    """``k`` layers with an identity shortcut around them (``k = 0``: one plain layer, no shortcut)."""

    def __init__(self, width: int, shortcut: int, relu: bool, bias: bool = False):
        super().__init__()
        self.shortcut = shortcut
        self.relu = relu
        n = max(shortcut, 1)
        self.layers = nn.ModuleList(nn.Linear(width, width, bias=bias) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for i, layer in enumerate(self.layers):
            h = layer(h)
            if self.relu and i < len(self.layers) - 1:
                h = relu0(h)
        if self.shortcut >= 1:
            h = x + h
        return relu0(h) if self.relu else h


class ShortcutNet(nn.Module):
    """``stem -> blocks -> head`` over the flattened input."""

    def __init__(self, in_shape, num_classes: int, width: int, num_blocks: int, shortcut: int,
                 relu: bool, bias: bool):
        super().__init__()
        self.in_shape = tuple(in_shape)
        self.stem = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(in_shape), width, bias=bias))
        self.head = nn.Linear(width, num_classes, bias=bias)
        self.relu = relu
        self.blocks = nn.Sequential(
            *[ShortcutBlock(width, shortcut, relu, bias) for _ in range(num_blocks)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        if self.relu:
            h = relu0(h)
        return self.head(self.blocks(h))


def init_shortcut_net_(
    net: ShortcutNet, init: str, scale: float = 0.1, part: str = "all"
) -> ShortcutNet:
    """Apply one of :data:`INITS` (see the module docstring) to ``part``: "io" (stem and
    head), "blocks" or "all"."""
    io_layers = [net.stem[1], net.head] if part in ("all", "io") else []
    block_layers = [lay for b in net.blocks for lay in b.layers] if part != "io" else []
    with torch.no_grad():
        for lay in io_layers + block_layers:
            if lay.bias is not None:
                lay.bias.zero_()
        io_fn = nn.init.xavier_normal_ if init == "xavier" else nn.init.orthogonal_
        for lay in io_layers:
            io_fn(lay.weight)
        for lay in block_layers:
            if init == "zero":
                lay.weight.zero_()
            elif init == "small":
                lay.weight.normal_(0.0, scale / math.sqrt(lay.in_features))
            else:
                io_fn(lay.weight)
    return net


def _build(in_shape, num_classes, depth, width, shortcut, init, scale, bias, relu) -> ShortcutNet:
    depth, shortcut = int(depth), int(shortcut)
    if shortcut < 0:
        raise ValueError(f"shortcut must be >= 0, got {shortcut}")
    per_block = max(shortcut, 1)
    if depth < 2 + per_block or (depth - 2) % per_block:
        raise ValueError(
            f"depth must be 2 + n*{per_block} with n >= 1 (stem + n blocks of {per_block} "
            f"layer(s) + head) for shortcut={shortcut}, got depth={depth}"
        )
    if init not in INITS:
        raise ValueError(f"init must be one of {', '.join(INITS)}, got {init!r}")
    # stem and head are built and initialised before the blocks draw random numbers, so
    # one seed gives the same input/output layers at every depth
    net = ShortcutNet(in_shape, num_classes, width, 0, shortcut, relu, bias)
    init_shortcut_net_(net, init, scale, part="io")
    net.blocks = nn.Sequential(
        *[ShortcutBlock(width, shortcut, relu, bias) for _ in range((depth - 2) // per_block)]
    )
    return init_shortcut_net_(net, init, scale, part="blocks")


@register_model(family="shortcut", kind="other")
def shortcut_linear(
    in_shape=(1, 40), num_classes: int = 10, depth: int = 10, width: int = 16, shortcut: int = 2,
    init: str = "small", scale: float = 0.1, bias: bool = False,
) -> ShortcutNet:
    """Deep linear net, identity shortcut around every k layers (paper 3); k=0: no shortcut."""
    return _build(in_shape, num_classes, depth, width, shortcut, init, scale, bias, relu=False)


@register_model(family="shortcut", kind="other")
def shortcut_mlp(
    in_shape=(1, 40), num_classes: int = 10, depth: int = 10, width: int = 16, shortcut: int = 2,
    init: str = "small", scale: float = 0.1, bias: bool = False,
) -> ShortcutNet:
    """ReLU net, identity shortcut around every k layers (post-activation); k=0: no shortcut."""
    return _build(in_shape, num_classes, depth, width, shortcut, init, scale, bias, relu=True)
