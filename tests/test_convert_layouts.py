"""ResNet layouts people use -> exact plain chains: torchvision (Basic, Bottleneck, ResNeXt,
Wide), timm (ResNet, ResNetV2 pre-activation), written here by hand in the libraries' layouts
(the real libraries: tests/test_convert_ecosystem.py); refusals; ONNX without Add."""

from __future__ import annotations

import math

import pytest
import torch
import user_models as um
from _helpers import randomised
from torch import nn

from pnnh.convert import plain_cost, resnet_to_plain
from pnnh.errors import ConfigError
from pnnh.plainness import find_skips

PLAIN = (nn.Linear, nn.Conv2d, nn.ReLU, nn.Flatten, nn.MaxPool2d, nn.AdaptiveAvgPool2d)


def assert_exact_plain(model: nn.Module, x: torch.Tensor) -> nn.Sequential:
    plain = resnet_to_plain(model)
    assert all(isinstance(m, PLAIN) for m in plain)
    with torch.no_grad():
        y = model(x)
        assert float(y.abs().max()) > 0.1
        assert torch.allclose(plain(x), y, atol=1e-4, rtol=1e-4)
    assert find_skips(plain, x) == []
    return plain


# --------------------------------------------------------------------------- torchvision layout


def tv_resnet(block, layers=(1, 2, 1, 1), widths=(8, 16, 32, 64), **block_kw):
    """torchvision's ResNet layout with ``block`` (``block_kw``: ResNeXt groups, Wide width)."""
    net = um.ResNet(block=um.BasicBlock, layers=(1, 1, 1, 1), widths=widths)
    net.inplanes = widths[0]
    for i, (n, w) in enumerate(zip(layers, widths)):
        stride = 1 if i == 0 else 2
        down = None
        if stride != 1 or net.inplanes != w * block.expansion:
            down = nn.Sequential(nn.Conv2d(net.inplanes, w * block.expansion, 1, stride,
                                           bias=False), nn.BatchNorm2d(w * block.expansion))
        blocks = [block(net.inplanes, w, stride, down, **block_kw)]
        net.inplanes = w * block.expansion
        blocks += [block(net.inplanes, w, **block_kw) for _ in range(1, n)]
        setattr(net, f"layer{i + 1}", nn.Sequential(*blocks))
    net.fc = nn.Linear(widths[-1] * block.expansion, 10)
    return net


TV_CASES = {
    "resnet-basic": lambda: tv_resnet(um.BasicBlock),
    "resnet-bottleneck": lambda: tv_resnet(um.Bottleneck),
    "resnext-groups4": lambda: tv_resnet(um.Bottleneck, groups=4, base_width=16),
    "wide-resnet": lambda: tv_resnet(um.Bottleneck, base_width=128),
    "preact-resnet": lambda: um.ResNet(block=um.PreActBlock),
}


@pytest.mark.parametrize("case", sorted(TV_CASES))
def test_torchvision_layouts_convert_exactly(case):
    torch.manual_seed(0)
    model = randomised(TV_CASES[case]())
    assert_exact_plain(model, torch.randn(2, 3, 48, 48))


def test_bottleneck_carrier_is_grouped_in_the_3x3_layer():
    """Identity Bottleneck (C = 32 in, m = 8): layer 1 [W₁; I] (1x1, 8+32 out), layer 2 the
    3x3 as groups = (m + C)/m = 5 (branch group + 4 Dirac groups), layer 3 [W₃, I]."""
    torch.manual_seed(0)
    block = randomised(um.Bottleneck(32, 8))
    from pnnh.convert import convert_block

    l1, _, l2, _, l3, _ = convert_block(block)
    assert (l1.in_channels, l1.out_channels, l1.groups) == (32, 40, 1)
    assert (l2.in_channels, l2.out_channels, l2.groups) == (40, 40, 5)
    assert (l3.in_channels, l3.out_channels) == (40, 32)
    # dense parameters: C(m + C) + 9(m + C)·m + C(m + C), biases m + C, m + C, C
    assert sum(p.numel() for p in (l1.weight, l2.weight, l3.weight)) == 32 * 40 + 9 * 40 * 8 + 40 * 32
    x = torch.randn(2, 32, 6, 6).relu()
    with torch.no_grad():
        assert torch.allclose(nn.Sequential(l1, nn.ReLU(), l2, nn.ReLU(), l3, nn.ReLU())(x),
                              block(x), atol=1e-5)


def test_resnext_carrier_groups_follow_the_branch_groups():
    """ResNeXt branch groups of 4 channels: the carrier joins as more groups of 4."""
    torch.manual_seed(0)
    block = randomised(um.Bottleneck(64, 16, groups=4, base_width=16))  # width 16, 4 groups of 4
    from pnnh.convert import convert_block

    l2 = convert_block(block)[2]
    assert l2.groups == (16 + 64) // 4


# --------------------------------------------------------------------------- timm layout


class DropPath(nn.Module):  # timm's names: identities in eval mode
    def forward(self, x):
        return x


class DropBlock2d(DropPath):
    pass


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's BatchNorm + activation in one module."""

    def __init__(self, n, apply_act=True):
        super().__init__(n)
        self.drop = nn.Identity()
        self.act = nn.ReLU() if apply_act else nn.Identity()

    def forward(self, x):
        return self.act(super().forward(x))


class TimmBasic(nn.Module):
    expansion = 1

    def __init__(self, cin, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.drop_block = DropBlock2d()
        self.act1 = nn.ReLU(inplace=True)
        self.aa = nn.Identity()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act2 = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.drop_path = DropPath()

    def forward(self, x):
        shortcut = x
        x = self.aa(self.act1(self.drop_block(self.bn1(self.conv1(x)))))
        x = self.drop_path(self.bn2(self.conv2(x)))
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        return self.act2(x + shortcut)


class SelectAdaptivePool2d(nn.Module):
    def __init__(self):
        super().__init__()
        self.pool, self.flatten = nn.AdaptiveAvgPool2d(1), nn.Flatten(1)

    def forward(self, x):
        return self.flatten(self.pool(x))


class TimmResNet(nn.Module):
    """timm's ResNet layout: a deep stem as ``conv1``, ``act1``, ``global_pool``."""

    def __init__(self, widths=(8, 16)):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1, bias=False), nn.BatchNorm2d(4),
                                   nn.ReLU(), nn.Conv2d(4, widths[0], 3, 1, 1, bias=False))
        self.bn1, self.act1 = nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = widths[0]
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            down = None if stride == 1 else nn.Sequential(
                nn.Conv2d(cin, w, 1, stride, bias=False), nn.BatchNorm2d(w))
            setattr(self, f"layer{i + 1}", nn.Sequential(TimmBasic(cin, w, stride, down),
                                                         TimmBasic(w, w)))
            cin = w
        self.global_pool, self.fc = SelectAdaptivePool2d(), nn.Linear(cin, 10)

    def forward(self, x):
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        return self.fc(self.global_pool(self.layer2(self.layer1(x))))


class PreActBottleneck(nn.Module):
    """timm ResNetV2's block: the projection reads ``relu(norm1(x))``."""

    def __init__(self, cin, cout, stride=1, proj=False):
        super().__init__()
        mid = cout // 4
        self.downsample = None
        if proj:
            self.downsample = nn.Module()
            self.downsample.conv = nn.Conv2d(cin, cout, 1, stride, bias=False)
            self.downsample.norm = nn.Identity()
            self.downsample.forward = lambda x: self.downsample.conv(x)
        self.norm1 = BatchNormAct2d(cin)
        self.conv1 = nn.Conv2d(cin, mid, 1, bias=False)
        self.norm2 = BatchNormAct2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, bias=False)
        self.norm3 = BatchNormAct2d(mid)
        self.conv3 = nn.Conv2d(mid, cout, 1, bias=False)
        self.drop_path = nn.Identity()

    def forward(self, x):
        x_preact = self.norm1(x)
        shortcut = x if self.downsample is None else self.downsample(x_preact)
        x = self.conv1(x_preact)
        x = self.conv3(self.norm3(self.conv2(self.norm2(x))))
        return self.drop_path(x) + shortcut


class TimmResNetV2(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential()
        self.stem.add_module("conv", nn.Conv2d(3, 8, 7, 2, 3, bias=False))
        self.stem.add_module("pool", nn.MaxPool2d(3, 2, 1))
        self.stages = nn.Sequential()
        for i, (cin, cout, n) in enumerate([(8, 32, 2), (32, 64, 2)]):
            stage = nn.Module()
            stage.blocks = nn.Sequential(*[
                PreActBottleneck(cin if j == 0 else cout, cout, 1 if i == 0 else 2 if j == 0 else 1,
                                 proj=j == 0) for j in range(n)])
            self.stages.add_module(str(i), stage)
        self.norm = BatchNormAct2d(64)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(64, 10))

    def forward(self, x):
        x = self.stem(x)
        for s in self.stages:
            x = s.blocks(x)
        return self.head(self.norm(x))


@pytest.mark.parametrize("make", [TimmResNet, TimmResNetV2], ids=["resnet", "resnetv2"])
def test_timm_layouts_convert_exactly(make):
    torch.manual_seed(0)
    assert_exact_plain(randomised(make()), torch.randn(2, 3, 40, 40))


def test_pre_activation_cost_is_the_signed_carrier():
    """An identity PreActBottleneck (C = 32, m = 8) reads [a; relu(z); relu(−z)] (3C): 1x1
    (3C -> m + 2C), 3x3 (m + 2C, grouped), 1x1 (m + 2C -> C): the next block projects
    relu(norm1(z')), so only that is written (an identity block next would take 3C)."""
    torch.manual_seed(0)
    plain = resnet_to_plain(randomised(TimmResNetV2()))
    convs = [m for m in plain if isinstance(m, nn.Conv2d)]
    # stem conv, the 1x1 heads layer after the max-pool, then 3 per block
    block2 = convs[2 + 3:2 + 6]  # stages.0.blocks.1 (identity)
    assert [(c.in_channels, c.out_channels) for c in block2] == [(96, 72), (72, 72), (72, 32)]
    assert block2[1].groups == 9


# --------------------------------------------------------------------------- refusals


class ReLU6Block(um.BasicBlock):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.relu = nn.ReLU6()


class AttnBlock(um.BasicBlock):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.attn = nn.MultiheadAttention(4, 1)


class GNPreAct(um.PreActBlock):
    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__(inplanes, planes, stride, downsample)
        self.bn1 = nn.GroupNorm(2, inplanes)


class Extra(um.BasicBlock):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.scale = nn.Conv2d(1, 1, 1)


@pytest.mark.parametrize("block,words", [
    (um.SEBlock, "squeeze-excitation"), (ReLU6Block, "ReLU6 clips"),
    (AttnBlock, "attention"), (GNPreAct, "GroupNorm"), (Extra, "unknown sub-module 'scale'")])
def test_what_cannot_be_plain_is_named_before_anything_is_built(block, words, monkeypatch):
    import pnnh.convert_layouts as layouts

    built = []
    monkeypatch.setattr(layouts, "build_block", lambda *a: built.append(a))
    model = tv_resnet(um.BasicBlock, layers=(1, 1, 1, 1))
    model.layer4[0] = block(model.layer4[0].conv1.in_channels, 64, 2,
                            model.layer4[0].downsample)
    with pytest.raises(ConfigError) as e:
        resnet_to_plain(model.eval())
    msg = str(e.value)
    assert "\n" not in msg and "layer4.0" in msg and type(model.layer4[0]).__name__ in msg
    assert words in msg
    assert built == []


def test_unknown_layout_is_refused_with_the_layouts_understood():
    with pytest.raises(ConfigError, match="torchvision.*timm"):
        resnet_to_plain(nn.Sequential(nn.Linear(3, 3)))


# --------------------------------------------------------------------------- deployable


@pytest.mark.parametrize("case", ["resnet-bottleneck", "preact-resnet", "resnext-groups4"])
def test_onnx_of_the_plain_form_has_no_add_and_matches(case, tmp_path):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    import onnx

    from pnnh.checkpoint import export_model

    torch.manual_seed(0)
    model = randomised(TV_CASES[case]())
    path = export_model(model, "onnx", tmp_path / "plain.onnx", (3, 48, 48))
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert not ops & {"Add", "Sum", "Concat", "Mul"}, ops
    assert ops <= {"Conv", "Relu", "MaxPool", "GlobalAveragePool", "Flatten", "Gemm", "Identity",
                   "Reshape"}, ops
    x = torch.randn(3, 3, 48, 48)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        want = model(x).numpy()
    assert abs(got - want).max() <= 1e-4 * max(1.0, float(abs(want).max()))


def test_cli_exports_a_users_resnet_from_a_model_file(tmp_path, capsys):
    pytest.importorskip("onnx")
    from pnnh.cli import main
    from pnnh.export import load_plain

    src = tmp_path / "my_resnet.py"
    here = str(__import__("pathlib").Path(__file__).parent)
    src.write_text(f"import sys\nsys.path.insert(0, {here!r})\nimport user_models\n\n"
                   "def make():\n    return user_models.ResNet(block=user_models.Bottleneck)\n")
    out = tmp_path / "plain.pt"
    assert main(["export", "--model-file", f"{src}:make", "--input-shape", "3,32,32",
                 "--out", str(out)]) == 0
    plain = load_plain(out)
    assert find_skips(plain, torch.randn(1, 3, 32, 32)) == []
    assert main(["export", "--model-file", f"{src}:make", "--out", str(out)]) == 2
    assert "--input-shape: needed" in capsys.readouterr().err


def test_plain_cost_counts_dense_and_nonzero_weights():
    torch.manual_seed(0)
    model = randomised(tv_resnet(um.Bottleneck))
    plain = resnet_to_plain(model)
    x = torch.randn(1, 3, 32, 32)
    a, b = plain_cost(model, x), plain_cost(plain, x)
    assert b["params"] > b["nonzero_params"]  # the carrier's Dirac kernels are mostly zeros
    assert b["macs"] > a["macs"]
    conv = nn.Conv2d(4, 8, 3, padding=1, groups=2)
    assert plain_cost(conv, torch.randn(1, 4, 5, 5))["macs"] == 8 * 25 * 2 * 9
    assert math.isclose(plain_cost(nn.Linear(3, 2), torch.randn(1, 3))["macs"], 6)
