"""Stochastic depth (``drop_path_rate``) on the MLP families: the per-sample rule, the linear
rise over depth, eval mode untouched, exact export, and conversion that keeps the draws."""

from __future__ import annotations

import pytest
import torch

from pnnh.convert import pnnh_to_resnet, resnet_to_pnnh
from pnnh.errors import ConfigError
from pnnh.export import to_plain
from pnnh.models import create_model
from pnnh.models.layers import drop_path, set_drop_path


def test_drop_path_keeps_or_drops_whole_samples_and_is_unbiased():
    t = torch.randn(4000, 3, 5)
    torch.manual_seed(0)
    out = drop_path(t, 0.25, training=True)
    scale = (out / t).reshape(4000, -1)
    # each sample is either dropped (0) or kept and rescaled by 1 / (1 - p), as a whole
    assert torch.allclose(scale, scale[:, :1].expand_as(scale))
    kept = scale[:, 0] != 0
    assert torch.allclose(scale[kept, 0], torch.tensor(1 / 0.75))
    dropped = 1 - float(kept.float().mean())
    assert abs(dropped - 0.25) < 0.03  # 4000 draws: 3 standard deviations is 0.021
    assert drop_path(t, 0.25, training=False) is t
    assert drop_path(t, 0.0, training=True) is t


def test_rates_rise_linearly_to_the_last_block():
    model = create_model("pnnh_mlp", depth=12, width=8, drop_path_rate=0.3)
    assert [round(b.drop_path, 6) for b in model.blocks] == [0.0, 0.075, 0.15, 0.225, 0.3]
    with pytest.raises(ConfigError, match="drop_path_rate") as e:
        create_model("resnet_mlp", depth=12, width=8, drop_path_rate=1.0)
    assert e.value.field == "drop_path_rate"
    with pytest.raises(ConfigError, match="drop_path_rate"):
        set_drop_path(list(model.blocks), -0.1)


@pytest.mark.parametrize("name", ["pnnh_mlp", "resnet_mlp"])
def test_training_draws_change_the_output_and_eval_does_not(name):
    torch.manual_seed(0)
    model = create_model(name, depth=10, width=16, drop_path_rate=0.5)
    for b in model.blocks:  # non-zero branches, so that dropping one is visible
        torch.nn.init.normal_(b.dec.weight if name == "pnnh_mlp" else b.fc2.weight, std=0.1)
    ref = create_model(name, depth=10, width=16)
    ref.load_state_dict(model.state_dict())
    x = torch.randn(64, 1, 40)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), ref.eval()(x))
        model.train()
        a, b = model(x), model(x)
    assert not torch.allclose(a, b)  # fresh draws each pass
    ref.train()
    assert not torch.allclose(a, ref(x))


def test_pnnh_with_drop_path_exports_exactly():
    torch.manual_seed(0)
    model = create_model("pnnh_mlp", depth=10, width=16, drop_path_rate=0.4)
    for b in model.blocks:
        torch.nn.init.normal_(b.dec.weight, std=0.1)
    x = torch.randn(32, 1, 40)
    plain = to_plain(model.eval())
    with torch.no_grad():
        assert torch.allclose(plain(x), model(x), atol=1e-5)


@pytest.mark.parametrize("name,in_shape,depth", [("pnnh_mlp", (1, 40), 10),
                                                  ("pnnh_cnn1d", (1, 40), 8),
                                                  ("pnnh20", (3, 16, 16), 20)])
def test_conversion_keeps_the_rates_and_the_same_draws_in_training(name, in_shape, depth):
    """PNNH nets (a conv transition block included) and their ResNets: the same rates after
    conversion both ways, the same outputs in training under the same draws."""
    torch.manual_seed(0)
    pnnh = create_model(name, in_shape=in_shape, depth=depth, width=8, drop_path_rate=0.5)
    for b in pnnh.blocks:  # non-zero learner terms (they start at zero), so drops show
        if isinstance(b.bn2, torch.nn.BatchNorm2d):
            torch.nn.init.ones_(b.bn2.weight)
        else:
            torch.nn.init.normal_(b.dec.weight, std=0.1)
    rates = [b.drop_path for b in pnnh.blocks]
    assert rates[0] == 0.0 and rates[-1] == 0.5
    resnet = pnnh_to_resnet(pnnh)
    assert [b.drop_path for b in resnet.blocks] == rates
    assert [b.drop_path for b in resnet_to_pnnh(resnet.eval()).blocks] == rates
    x = torch.randn(16, *in_shape)
    pnnh.train()
    resnet.train()
    torch.manual_seed(3)
    a = pnnh(x)
    torch.manual_seed(3)
    b = resnet(x)
    assert torch.allclose(a, b, atol=1e-4)
    torch.manual_seed(4)
    assert not torch.allclose(pnnh(x), a)  # other draws, another output


def test_every_resnet_and_pnnh_factory_takes_the_rate_and_plain_ones_do_not():
    from pnnh.models import list_models

    for name in ("resnet_cnn1d", "resnet20", "resnet56", "resnet110", "pnnh56", "pnnh110"):
        model = create_model(name, drop_path_rate=0.2)
        assert max(b.drop_path for b in model.blocks) == pytest.approx(0.2), name
    model = create_model("resnet18", in_shape=(3, 32, 32), drop_path_rate=0.2)
    assert model.blocks[-1].drop_path == pytest.approx(0.2)
    model = create_model("pnnh18", in_shape=(3, 32, 32), drop_path_rate=0.2)
    assert model.blocks[-1].drop_path == pytest.approx(0.2)
    for name in ("procrustes_resnet_mlp", "procrustes_resnet20"):  # transitions included
        model = create_model(name, drop_path_rate=0.2)
        assert max(b.drop_path for b in model.blocks) == pytest.approx(0.2), name
        assert all(hasattr(b, "drop_path") for b in model.blocks), name
    for name in ("vit_tiny", "pnnh_vit_tiny"):
        model = create_model(name, drop_path_rate=0.2)
        assert [b.drop_path for b in model.blocks] == pytest.approx([0.0, 0.04, 0.08, 0.12, 0.16,
                                                                    0.2]), name
    assert "plain20" in list_models()
    for name in ("plain20", "plain_vit_tiny"):
        with pytest.raises(Exception, match="drop_path_rate"):
            create_model(name, drop_path_rate=0.2)


@pytest.mark.parametrize("fused", [True, False])
def test_vit_sublayers_drop_only_the_learner_term_per_sample(fused):
    """PNNH-ViT: in training a dropped sample carries ``AᵀA c`` alone and a kept one ``AᵀA c +
    learner / (1 - p)`` (masks re-drawn from the same seed); the residual ViT block drops each
    branch the same way. In eval nothing is dropped."""
    torch.manual_seed(0)
    model = create_model("pnnh_vit_tiny", depth=2, width=16, heads=2, fused=fused,
                         drop_path_rate=0.5)
    block = model.blocks[1]
    assert block.attn.drop_path == block.mlp.drop_path == 0.5
    attn, mlp, p = block.attn, block.mlp, 0.5
    x = torch.randn(32, 10, 16)
    with torch.no_grad():
        eval_attn, eval_mlp = attn.eval()(x), mlp.eval()(x)
        a, b = attn.coder.weight, mlp.coder.weight  # each sublayer has its own coder
        coder_attn, coder_mlp = x @ a.t() @ a, x @ b.t() @ b  # c = x (coder_norm=False)
        learner_attn, learner_mlp = eval_attn - coder_attn, eval_mlp - coder_mlp
        attn.train(), mlp.train()
        for layer, coder, learner in ((attn, coder_attn, learner_attn),
                                      (mlp, coder_mlp, learner_mlp)):
            torch.manual_seed(3)
            out = layer(x)
            torch.manual_seed(3)
            mask = drop_path(torch.ones(32, 1, 1), p, True)
            assert set(mask.flatten().tolist()) == {0.0, 2.0}
            assert torch.allclose(out, coder + mask * learner, atol=1e-5)

    res = create_model("vit_tiny", depth=2, width=16, heads=2, drop_path_rate=0.5).blocks[1]
    with torch.no_grad():
        branch = res.attn(res.ln1(x))
        torch.manual_seed(5)
        out = res.train()(x)
        torch.manual_seed(5)
        m1 = drop_path(torch.ones(32, 1, 1), p, True)
        m2 = drop_path(torch.ones(32, 1, 1), p, True)
        h = x + m1 * branch
        assert torch.allclose(out, h + m2 * res.mlp(res.ln2(h)), atol=1e-5)


def test_pnnh_vit_with_drop_path_exports_exactly():
    from pnnh.models.vit import vit_to_plain

    torch.manual_seed(0)
    model = create_model("pnnh_vit_tiny", depth=3, width=16, heads=2, drop_path_rate=0.4)
    ref = create_model("pnnh_vit_tiny", depth=3, width=16, heads=2)
    ref.load_state_dict(model.state_dict())
    x = torch.randn(8, 1, 40)
    with torch.no_grad():
        model.eval(), ref.eval()
        assert torch.equal(model(x), ref(x))
        assert torch.allclose(vit_to_plain(model).eval()(x), model(x), atol=1e-5)
        model.train()
        assert not torch.allclose(model(x), model(x))
