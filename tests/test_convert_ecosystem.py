"""resnet_to_plain on the real libraries' ResNets (random init, randomised BatchNorm, nothing
downloaded): torchvision and timm, at a small input size. Runs in make test-ecosystem."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytestmark = pytest.mark.ecosystem
torchvision = pytest.importorskip("torchvision", reason="needs the ecosystem environment")
timm = pytest.importorskip("timm", reason="needs the ecosystem environment")

from _helpers import randomised  # noqa: E402

from pnnh.convert import resnet_to_plain  # noqa: E402
from pnnh.errors import ConfigError  # noqa: E402
from pnnh.plainness import find_skips  # noqa: E402


def _randomised(model: nn.Module) -> nn.Module:
    return randomised(model, weight_noise=0.0)


MODELS = {
    "tv.resnet18": lambda: torchvision.models.resnet18(num_classes=10),
    "tv.resnet50": lambda: torchvision.models.resnet50(num_classes=10),
    "tv.resnext50_32x4d": lambda: torchvision.models.resnext50_32x4d(num_classes=10),
    "tv.wide_resnet50_2": lambda: torchvision.models.wide_resnet50_2(num_classes=10),
    "timm.resnet18": lambda: timm.create_model("resnet18", num_classes=10),
    "timm.resnet50": lambda: timm.create_model("resnet50", num_classes=10, drop_path_rate=0.1,
                                               drop_block_rate=0.1),
    "timm.resnetv2_50": lambda: timm.create_model("resnetv2_50", num_classes=10),
    "timm.resnetv2_18": lambda: timm.create_model("resnetv2_18", num_classes=10),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_real_resnets_convert_exactly(name):
    torch.manual_seed(0)
    model = _randomised(MODELS[name]())
    plain = resnet_to_plain(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        y = model(x)
        err = float((plain(x) - y).abs().max())
    assert err <= 1e-4 * max(1.0, float(y.abs().max())), err
    assert find_skips(plain, x) == []


@pytest.mark.parametrize("name,words", [("seresnet18", "squeeze-excitation"),
                                        ("resnetaa50", "anti-aliasing"),
                                        ("resnet50d", "average-pool shortcut"),
                                        ("resnetv2_50x1_bit", "per-sample statistics")])
def test_real_resnets_without_a_plain_form_are_named(name, words):
    with pytest.raises(ConfigError, match=words) as e:
        resnet_to_plain(timm.create_model(name, num_classes=10).eval())
    assert "\n" not in str(e.value) and "cannot convert" in str(e.value)
