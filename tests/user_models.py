"""Models written the way other libraries write them, by hand (no torchvision/timm/transformers):
what a user brings to pnnh. Each factory takes no argument, as ``--model-file FILE:FACTORY``
expects; ``INPUT_SHAPES`` gives the per-sample input shape each one is probed on.

- ``vgg``: a plain VGG-style CNN with BatchNorm (``features``, ``classifier``);
- ``tv_resnet``: a ResNet in torchvision's layout (``conv1/bn1/relu/maxpool``, ``layer1..4``
  of BasicBlocks ``conv1/bn1/conv2/bn2`` + ``downsample``, ``avgpool``, ``fc``), one shared
  ``self.relu`` called twice per block, as torchvision does;
- ``transformer``: an ``nn.TransformerEncoder`` classifier on (tokens, features) inputs;
- ``hf_stack``: a Hugging Face BERT-style ``encoder.layer`` stack (hand-written attention,
  ``LayerNorm(dense(h) + input)`` twice per layer).
"""

from __future__ import annotations

import math

import torch
from torch import nn

INPUT_SHAPES = {"vgg": (3, 16, 16), "tv_resnet": (3, 32, 32), "transformer": (6, 16),
                "hf_stack": (6, 16)}


# --------------------------------------------------------------------------- VGG
class VGG(nn.Module):
    def __init__(self, num_classes: int = 10, widths=(8, 8, 16, 16)):
        super().__init__()
        layers, cin = [], 3
        for i, w in enumerate(widths):
            layers += [nn.Conv2d(cin, w, 3, padding=1, bias=False), nn.BatchNorm2d(w),
                       nn.ReLU(inplace=True)]
            if i % 2 == 1:
                layers.append(nn.MaxPool2d(2))
            cin = w
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                        nn.Linear(cin, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


def vgg() -> nn.Module:
    return VGG()


# --------------------------------------------------------------------------- torchvision ResNet
def conv3x3(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 3, stride, 1, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    """torchvision's Bottleneck (V1.5: stride on the 3x3; ``groups`` and ``base_width`` give
    ResNeXt and Wide ResNet)."""

    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, groups=1, base_width=64):
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class PreActBlock(BasicBlock):
    """Pre-activation: ``x + conv2(relu(bn2(conv1(relu(bn1(x))))))`` (bn normalises inputs)."""

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__(inplanes, planes, stride, downsample)
        self.bn1 = nn.BatchNorm2d(inplanes)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.conv1(self.relu(self.bn1(x)))
        return self.conv2(self.relu(self.bn2(out))) + identity


class SEBlock(BasicBlock):
    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__(inplanes, planes, stride, downsample)
        self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(planes, 4, 1), nn.ReLU(),
                                nn.Conv2d(4, planes, 1), nn.Sigmoid())

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu(out * self.se(out) + identity)


class ResNet(nn.Module):
    def __init__(self, block=BasicBlock, layers=(2, 2, 2, 2), widths=(8, 16, 32, 64),
                 num_classes: int = 10):
        super().__init__()
        self.inplanes = widths[0]
        self.conv1 = nn.Conv2d(3, widths[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        for i, (n, w) in enumerate(zip(layers, widths)):
            setattr(self, f"layer{i + 1}", self._make_layer(block, w, n, 1 if i == 0 else 2))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[-1] * block.expansion, num_classes)

    def _make_layer(self, block, planes, blocks, stride):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def tv_resnet() -> nn.Module:
    return ResNet()


# --------------------------------------------------------------------------- nn.TransformerEncoder
class EncoderClassifier(nn.Module):
    def __init__(self, features: int = 16, d_model: int = 32, layers: int = 3,
                 num_classes: int = 10):
        super().__init__()
        self.embed = nn.Linear(features, d_model)
        layer = nn.TransformerEncoderLayer(d_model, nhead=4, dim_feedforward=64, dropout=0.0,
                                           batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x)).mean(1))


def transformer() -> nn.Module:
    return EncoderClassifier()


# --------------------------------------------------------------------------- HF-style stack
class SelfAttention(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, h):
        b, n, d = h.shape

        def split(t):
            return t.view(b, n, self.heads, d // self.heads).transpose(1, 2)

        q, k, v = split(self.query(h)), split(self.key(h)), split(self.value(h))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(d // self.heads)
        ctx = torch.matmul(scores.softmax(-1), v)
        return ctx.transpose(1, 2).reshape(b, n, d)


class SelfOutput(nn.Module):
    def __init__(self, d_in: int, d: int):
        super().__init__()
        self.dense, self.LayerNorm = nn.Linear(d_in, d), nn.LayerNorm(d)

    def forward(self, hidden, input_tensor):
        return self.LayerNorm(self.dense(hidden) + input_tensor)


class Attention(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.self, self.output = SelfAttention(d, heads), SelfOutput(d, d)

    def forward(self, h):
        return self.output(self.self(h), h)


class Intermediate(nn.Module):
    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.dense = nn.Linear(d, hidden)

    def forward(self, h):
        return nn.functional.gelu(self.dense(h))


class Layer(nn.Module):
    def __init__(self, d: int = 32, heads: int = 4, hidden: int = 64):
        super().__init__()
        self.attention = Attention(d, heads)
        self.intermediate = Intermediate(d, hidden)
        self.output = SelfOutput(hidden, d)

    def forward(self, h):
        a = self.attention(h)
        return self.output(self.intermediate(a), a)


class Encoder(nn.Module):
    def __init__(self, n: int = 4, d: int = 32):
        super().__init__()
        self.layer = nn.ModuleList(Layer(d) for _ in range(n))

    def forward(self, h):
        for layer in self.layer:
            h = layer(h)
        return h


class HFStack(nn.Module):
    def __init__(self, features: int = 16, d: int = 32, num_classes: int = 10):
        super().__init__()
        self.embeddings = nn.Linear(features, d)
        self.encoder = Encoder(4, d)
        self.classifier = nn.Linear(d, num_classes)

    def forward(self, x):
        return self.classifier(self.encoder(self.embeddings(x))[:, 0])


def hf_stack() -> nn.Module:
    return HFStack()
