"""ImageNet-style 4-stage 2-D CNNs: ``resnet18``, ``plain18``, ``pnnh18`` (and 34-layer sizes).

torchvision's ResNet-18 layout: stem, four stages of basic blocks (64, 128, 256, 512
channels x ``width / 64``; 2, 2, 2, 2 blocks for depth 18, 3, 4, 6, 3 for 34), stages 2-4
starting with a stride-2 transition, global average pooling, linear head. The stem is the
7x7 stride-2 conv + 3x3 max-pool for inputs of 64 pixels or more, and a 3x3 stride-1 conv
for small (e.g. 32x32) inputs, as is usual for CIFAR-sized ResNet-18s. Blocks are those of
:mod:`pnnh.models.cifar` (``model.blocks`` flattens the four stages).
"""

from __future__ import annotations

from torch import nn

from pnnh.coder import DEFAULT_CODER, CoderOptions, attach_constraint
from pnnh.models.cifar import ConvNet, head, make_blocks
from pnnh.models.layers import conv3x3, init_conv_bn_
from pnnh.registry import register_model

STAGES = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3]}


def imagenet_net(kind: str, in_shape=(3, 224, 224), num_classes: int = 1000, depth: int = 18,
                 width: int = 64, **opts) -> ConvNet:
    depth = int(depth)
    if depth not in STAGES:
        raise ValueError(f"depth must be one of {sorted(STAGES)}, got depth={depth}")
    if len(in_shape) != 3:
        raise ValueError(f"2-D CNNs take inputs (channels, height, width), got {in_shape}")
    c = in_shape[0]
    if min(in_shape[1:]) >= 64:
        stem = nn.Sequential(nn.Conv2d(c, width, 7, stride=2, padding=3, bias=False),
                             nn.BatchNorm2d(width), nn.ReLU(),
                             nn.MaxPool2d(3, stride=2, padding=1))
    else:
        stem = nn.Sequential(conv3x3(c, width), nn.BatchNorm2d(width), nn.ReLU())
    init_conv_bn_(stem)
    widths = [width, 2 * width, 4 * width, 8 * width]
    blocks = make_blocks(kind, widths, STAGES[depth], [1, 2, 2, 2], width, **opts)
    return ConvNet(in_shape, stem, blocks, head(widths[-1], num_classes))


@register_model(family="imagenet", kind="plain")
def plain18(in_shape=(3, 224, 224), num_classes: int = 1000, depth: int = 18,
            width: int = 64) -> ConvNet:
    """ResNet-18 layout without shortcuts (4 stages, BatchNorm)."""
    return imagenet_net("plain", in_shape, num_classes, depth, width)


@register_model(family="imagenet", kind="resnet")
def resnet18(in_shape=(3, 224, 224), num_classes: int = 1000, depth: int = 18, width: int = 64,
             zero_init_residual: bool = False, drop_path_rate: float = 0.0) -> ConvNet:
    """ResNet-18 (4 stages, BatchNorm, 1x1 projection shortcuts at transitions)."""
    return imagenet_net("resnet", in_shape, num_classes, depth, width,
                        zero_init_residual=zero_init_residual, drop_path_rate=drop_path_rate)


@register_model(family="imagenet", kind="pnnh", options=CoderOptions)
def pnnh18(in_shape=(3, 224, 224), num_classes: int = 1000, depth: int = 18, width: int = 64,
           learner_ratio: float = 1.0, drop_path_rate: float = 0.0,
           coder: CoderOptions = DEFAULT_CODER) -> ConvNet:
    """PNNH-18: ResNet-18 layout, coder + learner blocks, no shortcuts."""
    model = imagenet_net("pnnh", in_shape, num_classes, depth, width,
                         learner_ratio=learner_ratio, coder=coder, drop_path_rate=drop_path_rate)
    return attach_constraint(model, coder)
