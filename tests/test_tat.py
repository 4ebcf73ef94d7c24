"""TAT (pnnh.tat): the leaky-ReLU transform against its formulas and against dks, SUO init,
model building through the registry and the --tat flag, and a few training steps."""

import math

import pytest
import torch
import torch.nn.functional as F

from pnnh.cli import build_parser, train_config_from_args
from pnnh.errors import ConfigError
from pnnh.models import create_model
from pnnh.tat import TATLeakyReLU, apply_tat, chain_c0, leaky_relu_cmap, suo_, tat_negative_slope


def _dks_tat(nonlinear_layers: int, eta: float):
    pat = pytest.importorskip("dks.pytorch.activation_transform")
    base = pytest.importorskip("dks.base.activation_transform")

    def subnet_max(x, r_fn):  # a plain chain: the network's C map is r composed L times
        for _ in range(nonlinear_layers):
            x = r_fn(x)
        return x

    params = base._get_activations_params(["leaky_relu"], method="TAT",
                                          tat_params={"c_val_0_target": eta},
                                          subnet_max_func=subnet_max)["leaky_relu"]
    act = pat.get_transformed_activations(["leaky_relu"], method="TAT",
                                          tat_params={"c_val_0_target": eta},
                                          subnet_max_func=subnet_max)["leaky_relu"]
    return params, act


@pytest.mark.parametrize("layers,eta", [(31, 0.9), (99, 0.9), (7, 0.7)])
def test_activation_matches_dks(layers, eta):
    params, dks_act = _dks_tat(layers, eta)
    slope = tat_negative_slope(layers, eta)
    assert slope == pytest.approx(params["negative_slope"], abs=1e-6)
    ours = TATLeakyReLU(slope)
    assert ours.output_scale == pytest.approx(float(params["output_scale"]), rel=1e-6)
    x = torch.linspace(-4, 4, 101)
    torch.testing.assert_close(ours(x), dks_act(x).float(), atol=1e-5, rtol=1e-5)


def test_cmap_formula_matches_dks_and_monte_carlo():
    base = pytest.importorskip("dks.base.activation_transform")
    g = torch.Generator().manual_seed(0)
    u, w = torch.randn(2, 400_000, generator=g, dtype=torch.float64)
    for slope in (0.0, 0.3, 0.8):
        act = TATLeakyReLU(slope)
        for c in (-0.5, 0.0, 0.6, 0.95):
            assert leaky_relu_cmap(c, slope) == pytest.approx(base._leaky_relu_cmap(c, slope),
                                                             abs=1e-12)
            v = c * u + math.sqrt(1 - c * c) * w  # unit-variance pair with correlation c
            mc = (act(u) * act(v)).mean().item()
            assert mc == pytest.approx(leaky_relu_cmap(c, slope), abs=1e-2)


def test_slope_solves_the_chain_condition_and_shallow_nets_are_refused():
    for layers in (19, 31, 99):
        assert chain_c0(tat_negative_slope(layers, 0.9), layers) == pytest.approx(0.9, abs=1e-8)
    # ReLU itself gives C(0) = 1/pi for one layer; the slope decreases C(0) towards 0 (linear)
    assert chain_c0(0.0, 1) == pytest.approx(1 / math.pi)
    assert chain_c0(1.0, 50) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ConfigError, match="tat_eta"):
        tat_negative_slope(7, 0.9)  # 7 ReLUs reach only C(0) = 0.81
    with pytest.raises(ConfigError, match="tat_eta"):
        create_model("plain_mlp", depth=8, width=16, tat=True)
    assert create_model("plain_mlp", depth=8, width=16, tat=True, tat_eta=0.7).eta == 0.7


def test_suo_keeps_q_and_agrees_with_dks_on_square_layers():
    torch.manual_seed(0)
    x = torch.randn(4000, 64, dtype=torch.float64)
    for out_dim, in_dim in [(64, 64), (160, 64), (16, 64)]:
        w = suo_(torch.empty(out_dim, in_dim, dtype=torch.float64))
        q_out = (x @ w.t()).pow(2).mean()
        assert q_out.item() == pytest.approx(x.pow(2).mean().item(), rel=0.05)
    w = suo_(torch.empty(32, 16, 3))  # Delta: centre tap orthogonal (scaled), zeros elsewhere
    assert w[:, :, 0].abs().max() == 0 and w[:, :, 2].abs().max() == 0
    torch.testing.assert_close(w[:, :, 1].t() @ w[:, :, 1], 2.0 * torch.eye(16), atol=1e-5, rtol=0)
    psf = pytest.importorskip("dks.pytorch.parameter_sampling_functions")
    ref = psf.scaled_uniform_orthogonal_(torch.empty(48, 48, 3))
    for a in (ref, suo_(torch.empty(48, 48, 3))):  # same distribution: Delta, orthogonal centre
        torch.testing.assert_close(a[:, :, 1] @ a[:, :, 1].t(), torch.eye(48), atol=1e-5, rtol=0)
        assert a[:, :, 0].abs().max() == 0


@pytest.mark.parametrize("name,width", [("plain_mlp", 32), ("plain_cnn1d", 8)])
def test_tat_model_builds_and_trains(name, width):
    torch.manual_seed(0)
    model = create_model(name, depth=32, width=width, tat=True)
    assert model.nonlinear_layers == 31 and len(model.blocks) == 15
    acts = [m for m in model.modules() if isinstance(m, TATLeakyReLU)]
    assert len(acts) == 31 and not any(isinstance(m, torch.nn.ReLU) for m in model.modules())
    assert all(b.abs().max() == 0 for n, b in model.named_parameters() if n.endswith("bias"))
    x, y = torch.randn(64, 1, 40), torch.randint(0, 10, (64,))
    assert model(x).shape == (64, 10)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses) and losses[-1] < 0.8 * losses[0]


def test_non_plain_models_are_refused():
    for name, kw in [("resnet_mlp", {}), ("pnnh_mlp", {}), ("plain20", {"width": 4})]:
        with pytest.raises(ConfigError, match="tat"):
            create_model(name, tat=True, **kw)


def test_apply_tat_without_init_keeps_the_weights():
    base = create_model("plain_mlp", depth=32, width=16)
    net = apply_tat(base, init=False)
    torch.testing.assert_close(net.blocks[3][0].weight, base.blocks[3].fc1.weight)


def test_tat_flag_reaches_model_args():
    argv = ["train", "--model", "plain_mlp", "--tat", "--model-arg", "tat_eta=0.8"]
    cfg = train_config_from_args(build_parser(argv).parse_args(argv))
    assert cfg.model_args == {"tat": True, "tat_eta": 0.8}
    argv = ["train", "--model", "plain_mlp"]
    assert "tat" not in train_config_from_args(build_parser(argv).parse_args(argv)).model_args


def test_tat_eta_without_tat_is_an_error_not_ignored():
    with pytest.raises(ConfigError, match=r"tat_eta: only applies with tat=True"):
        create_model("plain_mlp", depth=8, width=16, tat_eta=0.7)
    with pytest.raises(ConfigError, match="tat_eta"):
        create_model("plain_mlp", depth=8, width=16, tat=False, tat_eta=0.7)
