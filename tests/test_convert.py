"""ResNet -> exactly equivalent plain network through the internal-path construction."""

from __future__ import annotations

import pytest
import torch
from _helpers import trained_like
from torch import nn

from pnnh import create_model
from pnnh.convert import conversion_report, convert_block, resnet_to_plain
from pnnh.errors import PnnhError

CASES = [
    ("resnet_mlp", (1, 40), {"depth": 8}),
    ("resnet_mlp", (1, 40), {"depth": 32, "width": 32, "zero_init_residual": True}),
    ("resnet_cnn1d", (1, 40), {"depth": 8, "width": 8}),
    ("resnet20", (3, 32, 32), {"width": 4}),
    ("resnet56", (3, 32, 32), {"width": 2}),
    ("resnet18", (3, 32, 32), {"width": 4}),
    ("resnet18", (3, 64, 64), {"width": 4}),
]


@pytest.mark.parametrize("name,in_shape,kw", CASES)
def test_resnet_to_plain_is_exact(name, in_shape, kw):
    torch.manual_seed(0)
    model = trained_like(create_model(name, in_shape=in_shape, **kw))
    plain = resnet_to_plain(model)
    assert all(isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.ReLU, nn.Flatten, nn.MaxPool2d,
                              nn.AdaptiveAvgPool2d)) for m in plain)
    x = torch.randn(3, *in_shape)
    with torch.no_grad():
        y = model(x)
        assert y.abs().max() > 0.1
        assert torch.allclose(plain(x), y, atol=1e-5 * max(1.0, float(y.abs().max())))
    rep = conversion_report(model, plain, x)
    assert rep["max_abs_diff"] <= 1e-5 * max(1.0, float(y.abs().max()))
    assert rep["params_plain"] > rep["params_resnet"]  # the carried units cost parameters


def test_parameter_report_matches_the_construction():
    """MLP, width n, identity shortcuts: each block gains n·n + n (layer 1, weights and zero
    biases of the carried units) + n·n (layer 2)."""
    n, blocks = 16, 3
    model = create_model("resnet_mlp", depth=8, width=n)
    rep = conversion_report(model)
    assert rep["params_plain"] - rep["params_resnet"] == blocks * (2 * n * n + n)
    # a CIFAR transition carries its input x (C = 4, non-negative) and applies S in layer 2
    r20 = create_model("resnet20", width=4).eval()
    block = r20.blocks[3]
    l1, _, l2, _ = convert_block(block)
    assert l1.out_channels == 8 + 4 and l2.in_channels == 8 + 4


def test_the_carry_units_are_what_makes_it_exact():
    """Dropping the shortcut's carried units gives a different function (the test can fail)."""
    torch.manual_seed(0)
    model = trained_like(create_model("resnet_mlp", depth=8, width=16))
    plain = resnet_to_plain(model)
    with torch.no_grad():
        for m in plain:
            if isinstance(m, nn.Linear) and m.in_features == 32:  # a block's second layer
                m.weight[:, 16:] = 0
    x = torch.randn(4, 1, 40)
    with torch.no_grad():
        assert not torch.allclose(plain(x), model(x), atol=1e-3)


def test_convert_rejects_models_without_blocks():
    with pytest.raises(PnnhError):
        resnet_to_plain(nn.Linear(3, 3))
