"""CIFAR-style 2-D CNNs (He et al. 2016, Sec. 4.2): plain, ResNet and PNNH at 6n+2 layers.

A 3x3 stem conv (16 channels) + BN + ReLU, three stages of ``n`` blocks with 16, 32, 64
channels (x ``width / 16``), the first block of stages 2 and 3 a *transition* (stride 2,
channels doubled), global average pooling and a linear head: ``6n + 2`` weight layers
(``depth`` 20, 56, 110 give n = 3, 9, 18). All stages are flattened into one
``model.blocks`` ``nn.Sequential``; transition blocks carry ``transition = True`` with their
strided conv as ``conv1`` (and, for the ResNet, the projection shortcut as ``shortcut``).

- plain block:  ``relu(bn2(conv2(relu(bn1(conv1 x)))))``
- ResNet block: ``relu(bn2(conv2(relu(bn1(conv1 x)))) + shortcut(x))`` — identity, or a 1x1
  stride-2 conv + BN at transitions (option B);
- PNNH block:   :class:`pnnh.coder.PNNHBlock` with BatchNorm on the learner units only; at
  transitions the coder carries ``bn_c(S x)`` with ``S`` the ResNet's learned 1x1 stride-2
  conv (:class:`pnnh.coder.ProjectionCoder`, the default), or the fixed co-isometry ``P`` of
  :func:`pnnh.coder.pair_rows` (``transition_coder="orthogonal"``). At ``r = 1`` the PNNH net
  computes what a ResNet with the learner as branch computes (``docs/PNNH.md``, "The
  equivalence"; :func:`pnnh.convert.pnnh_to_resnet`); at the defaults its weights are drawn as
  the ResNet's (:func:`resnet_drawn_pnnh_block`): ``pnnh{d}`` and ``resnet{d}`` built under one
  seed are the same network, one laid out as plain layers.
"""

from __future__ import annotations

import torch
from torch import nn

from pnnh.coder import DEFAULT_CODER, CoderOptions, PNNHBlock, attach_constraint
from pnnh.models.layers import (
    StemBlocksHead,
    conv3x3,
    conv_bn,
    drop_path,
    init_conv_bn_,
    set_drop_path,
)
from pnnh.registry import register_model


class PlainBlock(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1 x)))))`` — a ResNet basic block without its shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.transition = stride != 1 or cin != cout
        self.conv1 = conv3x3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = conv3x3(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        init_conv_bn_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))

    def to_plain_layers(self) -> list[nn.Module]:
        return [conv_bn(self.conv1, self.bn1), nn.ReLU(), conv_bn(self.conv2, self.bn2), nn.ReLU()]


class BasicBlock(nn.Module):
    """ResNet basic block: ``relu(bn2(conv2(relu(bn1(conv1 x)))) + shortcut(x))``."""

    def __init__(self, cin: int, cout: int, stride: int = 1, zero_init_residual: bool = False):
        super().__init__()
        self.transition = stride != 1 or cin != cout
        self.conv1 = conv3x3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = conv3x3(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        if self.transition:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))
        else:
            self.shortcut = nn.Identity()
        init_conv_bn_(self)
        if zero_init_residual:
            nn.init.zeros_(self.bn2.weight)
        self.drop_path = 0.0  # stochastic depth of the branch (training only)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(drop_path(out, self.drop_path, self.training) + self.shortcut(x))


class ConvNet(StemBlocksHead):
    """``stem -> blocks -> head`` for images; ``blocks`` is one ``nn.Sequential`` of all stages."""


def is_resnet_parametrisation(coder: CoderOptions) -> bool:
    """The coder options under which a BatchNorm PNNH block has the He-init ResNet block's
    parameters one for one: the defaults (a fixed identity coder at ``r = 1``, the learner's
    last BatchNorm at scale 1, a learned projection ``S`` + BatchNorm at transitions)."""
    return (coder.coder_ratio == 1.0 and coder.coder_kernel == 1
            and coder.coder_constraint == "fixed" and not coder.procrustes
            and coder.zero_init_decoder in (None, False) and coder.transition_norm in (None, True)
            and coder.transition_coder in (None, "projection"))


def resnet_drawn_pnnh_block(cin: int, cout: int, stride: int, coder: CoderOptions) -> PNNHBlock:
    """The PNNH block holding the weights that :class:`BasicBlock` ``(cin, cout, stride)`` draws,
    drawing them as it does: the global RNG moves exactly as for the ResNet block (the PNNH
    block itself is built on a forked RNG). So ``pnnh{d}`` and ``resnet{d}`` built under the
    same seed hold the same weights — ``E = conv1``, ``D = conv2``, ``S = shortcut[0]`` —
    and train alike, seed for seed (docs/PNNH.md, "Initialisation on BatchNorm CNNs")."""
    ref = BasicBlock(cin, cout, stride)
    with torch.random.fork_rng(devices=[]):
        block = PNNHBlock(cin, cout, dims=2, out_dim=cout, stride=stride, kernel_size=3,
                          batchnorm=True, **coder.block_kwargs())
    with torch.no_grad():
        block.enc.weight.copy_(ref.conv1.weight)
        block.dec.weight.copy_(ref.conv2.weight)
        if ref.transition:
            block.coder.weight.copy_(ref.shortcut[0].weight)
    return block


def make_blocks(kind: str, widths: list[int], counts: list[int], first_stride: list[int],
                cin: int, zero_init_residual: bool = False, learner_ratio: float = 1.0,
                coder: CoderOptions = DEFAULT_CODER,
                drop_path_rate: float = 0.0) -> list[nn.Module]:
    """Blocks of every stage, in order; the first block of a stage may be a transition.

    ``kind`` is ``"plain"``, ``"resnet"`` (``zero_init_residual``) or ``"pnnh"`` (learner
    ``round(learner_ratio · width)`` channels, coder per ``coder``); ``drop_path_rate``:
    stochastic depth of the residual branches / learner terms over all stages (not
    ``"plain"``: without a shortcut, dropping a block would add one).
    """
    blocks: list[nn.Module] = []
    for width, count, stride in zip(widths, counts, first_stride):
        for i in range(count):
            s = stride if i == 0 else 1
            if kind == "plain":
                blocks.append(PlainBlock(cin, width, s))
            elif kind == "resnet":
                blocks.append(BasicBlock(cin, width, s, zero_init_residual))
            elif learner_ratio == 1.0 and is_resnet_parametrisation(coder):
                blocks.append(resnet_drawn_pnnh_block(cin, width, s, coder))
            else:
                lw = max(1, int(round(learner_ratio * width)))
                blocks.append(PNNHBlock(cin, lw, dims=2, out_dim=width, stride=s, kernel_size=3,
                                        batchnorm=True, **coder.block_kwargs()))
            cin = width
    if kind != "plain":
        set_drop_path(blocks, drop_path_rate)
    return blocks


def head(width: int, num_classes: int) -> nn.Sequential:
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))


def cifar_net(kind: str, in_shape=(3, 32, 32), num_classes: int = 10, depth: int = 20,
              width: int = 16, **opts) -> ConvNet:
    """The ``6n + 2``-layer CIFAR net of ``kind`` (see :func:`make_blocks` for ``opts``)."""
    depth = int(depth)
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"depth must be 6n+2 (20, 32, 44, 56, 110, ...), got depth={depth}")
    if len(in_shape) != 3:
        raise ValueError(f"2-D CNNs take inputs (channels, height, width), got {in_shape}")
    n = (depth - 2) // 6
    stem = nn.Sequential(conv3x3(in_shape[0], width), nn.BatchNorm2d(width), nn.ReLU())
    init_conv_bn_(stem)
    widths = [width, 2 * width, 4 * width]
    blocks = make_blocks(kind, widths, [n, n, n], [1, 2, 2], width, **opts)
    return ConvNet(in_shape, stem, blocks, head(widths[-1], num_classes))


def cifar_pnnh(in_shape, num_classes: int, depth: int, width: int, learner_ratio: float,
               coder: CoderOptions, drop_path_rate: float = 0.0) -> ConvNet:
    """:func:`cifar_net` of PNNH blocks with the coder constraint attached."""
    model = cifar_net("pnnh", in_shape, num_classes, depth, width, learner_ratio=learner_ratio,
                      coder=coder, drop_path_rate=drop_path_rate)
    return attach_constraint(model, coder)


# One function per public name (``depth`` defaults to the name's; other depths are accepted).


@register_model(family="cifar", kind="plain")
def plain20(in_shape=(3, 32, 32), num_classes: int = 10, depth: int = 20, width: int = 16) -> ConvNet:
    """CIFAR plain net, 20 layers (3 stages, BatchNorm), no shortcuts"""
    return cifar_net("plain", in_shape, num_classes, depth, width)


@register_model(family="cifar", kind="plain")
def plain56(in_shape=(3, 32, 32), num_classes: int = 10, depth: int = 56, width: int = 16) -> ConvNet:
    """CIFAR plain net, 56 layers (3 stages, BatchNorm), no shortcuts"""
    return cifar_net("plain", in_shape, num_classes, depth, width)


@register_model(family="cifar", kind="plain")
def plain110(in_shape=(3, 32, 32), num_classes: int = 10, depth: int = 110,
             width: int = 16) -> ConvNet:
    """CIFAR plain net, 110 layers (3 stages, BatchNorm), no shortcuts"""
    return cifar_net("plain", in_shape, num_classes, depth, width)


@register_model(family="cifar", kind="resnet")
def resnet20(in_shape=(3, 32, 32), num_classes: int = 10, depth: int = 20, width: int = 16,
             zero_init_residual: bool = False, drop_path_rate: float = 0.0) -> ConvNet:
    """CIFAR ResNet-20 (3 stages, BatchNorm, 1x1 projection at transitions)"""
    return cifar_net("resnet", in_shape, num_classes, depth, width,
                     zero_init_residual=zero_init_residual, drop_path_rate=drop_path_rate)


@register_model(family="cifar", kind="resnet")
def resnet56(in_shape=(3, 32, 32), num_classes: int = 10, depth: int = 56, width: int = 16,
             zero_init_residual: bool = False, drop_path_rate: float = 0.0) -> ConvNet:
    """CIFAR ResNet-56 (3 stages, BatchNorm, 1x1 projection at transitions)"""
    return cifar_net("resnet", in_shape, num_classes, depth, width,
                     zero_init_residual=zero_init_residual, drop_path_rate=drop_path_rate)


@register_model(family="cifar", kind="resnet")
def resnet110(in_shape=(3, 32, 32), num_classes: int = 10, depth: int = 110, width: int = 16,
              zero_init_residual: bool = False, drop_path_rate: float = 0.0) -> ConvNet:
    """CIFAR ResNet-110 (3 stages, BatchNorm, 1x1 projection at transitions)"""
    return cifar_net("resnet", in_shape, num_classes, depth, width,
                     zero_init_residual=zero_init_residual, drop_path_rate=drop_path_rate)


@register_model(family="cifar", kind="pnnh", options=CoderOptions)
def pnnh20(in_shape=(3, 32, 32), num_classes: int = 10, depth: int = 20, width: int = 16,
           learner_ratio: float = 1.0, drop_path_rate: float = 0.0,
           coder: CoderOptions = DEFAULT_CODER) -> ConvNet:
    """CIFAR PNNH-20: coder + learner blocks, BatchNorm on the learner, no shortcuts"""
    return cifar_pnnh(in_shape, num_classes, depth, width, learner_ratio, coder, drop_path_rate)


@register_model(family="cifar", kind="pnnh", options=CoderOptions)
def pnnh56(in_shape=(3, 32, 32), num_classes: int = 10, depth: int = 56, width: int = 16,
           learner_ratio: float = 1.0, drop_path_rate: float = 0.0,
           coder: CoderOptions = DEFAULT_CODER) -> ConvNet:
    """CIFAR PNNH-56: coder + learner blocks, BatchNorm on the learner, no shortcuts"""
    return cifar_pnnh(in_shape, num_classes, depth, width, learner_ratio, coder, drop_path_rate)


@register_model(family="cifar", kind="pnnh", options=CoderOptions)
def pnnh110(in_shape=(3, 32, 32), num_classes: int = 10, depth: int = 110, width: int = 16,
            learner_ratio: float = 1.0, drop_path_rate: float = 0.0,
            coder: CoderOptions = DEFAULT_CODER) -> ConvNet:
    """CIFAR PNNH-110: coder + learner blocks, BatchNorm on the learner, no shortcuts"""
    return cifar_pnnh(in_shape, num_classes, depth, width, learner_ratio, coder, drop_path_rate)
