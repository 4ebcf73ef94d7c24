"""The lean plain export: provably dead units dropped, duplicates merged, outputs unchanged."""

from __future__ import annotations

import pytest
import torch
from _helpers import trained_like
from torch import nn

from pnnh import count_parameters, create_model
from pnnh.export import prune_plain, to_plain
from pnnh.plainness import assert_plain

CASES = [
    ("pnnh20", (3, 32, 32), {"width": 8}),
    ("pnnh56", (3, 32, 32), {"width": 4}),
    ("pnnh_mlp", (1, 40), {"depth": 20, "width": 16}),
    ("pnnh_cnn1d", (1, 40), {"depth": 20, "width": 8}),
    # 10 classes: a 1000-class head would be a fifth of this small net and hide the coders
    ("pnnh18", (3, 32, 32), {"width": 4, "num_classes": 10}),
    # the fixed non-negative P at transitions: its -P half is dead too (a learned S's is not)
    ("pnnh20", (3, 32, 32), {"width": 8, "transition_coder": "orthogonal"}),
    ("plain20", (3, 32, 32), {"width": 8}),
]


@pytest.mark.filterwarnings("ignore:plainness")
@pytest.mark.parametrize("name,in_shape,kw", CASES)
def test_lean_export_keeps_outputs_and_drops_the_dead_coder_half(name, in_shape, kw):
    torch.manual_seed(0)
    model = trained_like(create_model(name, in_shape=in_shape, **kw))
    full, lean = to_plain(model, lean=False), to_plain(model)
    x = torch.randn(4, *in_shape)
    with torch.no_grad():
        y = model(x)
        assert y.abs().max() > 0.1
        # the export folds BatchNorm into the convolutions and re-associates every sum: float32
        # rounding of ~u·√(fan-in) per layer (u = 6e-8, fan-in <= 9·2C = 144 here) through up
        # to 57 layers, ~4e-5 of the output's scale, which trained-like weights blow up to ~1e4
        # on the 56-layer net; a wrong export is off by O(1) of that scale
        tol = 1e-4 * max(1.0, float(y.abs().max()))
        assert torch.allclose(lean(x), y, atol=tol, rtol=0)
        assert torch.allclose(full(x), y, atol=tol, rtol=0)
    assert_plain(lean, x)
    if name.startswith("pnnh"):
        # A = I on a ReLU output: the -A half is dead; so is -P for the non-negative P
        hidden_full = sum(m.out_channels if hasattr(m, "out_channels") else m.out_features
                          for m in full if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)))
        hidden_lean = sum(m.out_channels if hasattr(m, "out_channels") else m.out_features
                          for m in lean if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)))
        assert hidden_lean < hidden_full
        assert count_parameters(lean) < 0.8 * count_parameters(full)
    else:  # a plain net has nothing provably dead
        assert count_parameters(lean) == count_parameters(full)


@pytest.mark.parametrize("depth", [20, 56, 110])
def test_exported_cifar_pnnh_is_at_most_2_1x_the_resnet(depth):
    torch.manual_seed(0)
    pnnh = create_model(f"pnnh{depth}")
    ratio = count_parameters(to_plain(pnnh)) / count_parameters(create_model(f"resnet{depth}"))
    assert ratio <= 2.1


def _rand_layers(signed_first: bool):
    torch.manual_seed(0)
    l1, l2, l3 = nn.Linear(5, 6), nn.Linear(6, 4), nn.Linear(4, 3)
    with torch.no_grad():
        l2.weight[0] = -l2.weight[0].abs()  # non-positive row, bias <= 0: dead on a ReLU output
        l2.bias[0] = -0.1
        l2.weight[3] = l2.weight[1]  # a duplicate of unit 1
        l2.bias[3] = l2.bias[1]
    return [l1, nn.ReLU(), l2, nn.ReLU(), l3]


def test_prune_drops_dead_merges_duplicates_and_only_where_provable():
    layers = _rand_layers(True)
    pruned = prune_plain(layers)
    assert pruned[2].out_features == 2 and pruned[4].in_features == 2
    x = torch.randn(64, 5)
    with torch.no_grad():
        assert torch.allclose(nn.Sequential(*pruned)(x), nn.Sequential(*layers)(x), atol=1e-6)
    # the same non-positive unit on a *signed* input is alive: nothing but the duplicate goes
    signed = prune_plain(layers[2:])
    assert signed[0].out_features == 3
    with torch.no_grad():
        h = torch.randn(64, 6)
        assert torch.allclose(nn.Sequential(*signed)(h), nn.Sequential(*layers[2:])(h), atol=1e-6)
