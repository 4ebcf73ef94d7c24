"""Real torchvision models at random init, for ``--model-file benchmarks/models_real.py:NAME``
and the curvature benchmarks (10 classes; nothing is downloaded).

``vit_b_16`` is built for 64x64 inputs (``image_size=64``: 16 patches of 16x16 and the class
token; the same 86M parameters as at 224x224, only the position embedding is shorter), so that
every model here takes the benchmarks' 8 samples of 3x64x64.
"""

from __future__ import annotations

from torch import nn

IMAGE_SIZE = 64
NUM_CLASSES = 10


def resnet18() -> nn.Module:
    from torchvision.models import resnet18 as build
    return build(num_classes=NUM_CLASSES)


def resnet50() -> nn.Module:
    from torchvision.models import resnet50 as build
    return build(num_classes=NUM_CLASSES)


def convnext_tiny() -> nn.Module:
    from torchvision.models import convnext_tiny as build
    return build(num_classes=NUM_CLASSES)


def efficientnet_b0() -> nn.Module:
    from torchvision.models import efficientnet_b0 as build
    return build(num_classes=NUM_CLASSES)


def vit_b_16() -> nn.Module:
    from torchvision.models import vit_b_16 as build
    return build(num_classes=NUM_CLASSES, image_size=IMAGE_SIZE)


def tiny_cnn() -> nn.Module:
    """A 3x64x64 conv net with BatchNorm (no torchvision needed): the benchmarks' --quick model."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, NUM_CLASSES))


MODELS = {f.__name__: f for f in (resnet18, resnet50, convnext_tiny, efficientnet_b0, vit_b_16,
                                  tiny_cnn)}
