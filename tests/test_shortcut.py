"""Shortcut-depth models and the Hessian at the zero initial point (paper 3)."""

from __future__ import annotations

import pytest
import torch

from pnnh.errors import ConfigError
from pnnh.models import count_parameters, create_model, model_info
from pnnh.models.shortcut import relu0
from pnnh.probes.hessian import HessianOperator, condition_numbers, mse_loss

D = 6  # input = width = output dimension of the small regression problem


def regression_problem(n: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, D, generator=g, dtype=torch.float64)
    a = torch.randn(D, D, generator=g, dtype=torch.float64)
    y = x.flatten(1) @ a.T + 0.1 * torch.randn(n, D, generator=g, dtype=torch.float64)
    return x, y


def zero_net(name: str, depth: int, k: int, seed: int = 0):
    torch.manual_seed(seed)  # the same orthogonal stem/head at every depth
    return create_model(name, in_shape=(1, D), num_classes=D, depth=depth, width=D,
                        shortcut=k, init="zero").double()


def block_hessian_eigs(model, x, y) -> torch.Tensor:
    op = HessianOperator(model, (x, y), mse_loss, params="blocks")
    return torch.linalg.eigvalsh(op.dense())


def test_registered_as_other_with_depth_accounting():
    for name in ("shortcut_linear", "shortcut_mlp"):
        assert model_info(name).kind == "other"
        for k, depth, blocks in ((0, 5, 3), (1, 5, 3), (2, 8, 3), (3, 11, 3)):
            m = create_model(name, depth=depth, width=8, shortcut=k)
            assert len(m.blocks) == blocks
            n_weights = sum(1 for n, _ in m.named_parameters() if n.endswith("weight"))
            assert n_weights == depth
            assert m(torch.randn(3, 1, 40)).shape == (3, 10)
        assert count_parameters(create_model(name, depth=6, width=8, bias=True)) == (
            40 * 8 + 8 + 4 * (64 + 8) + 8 * 10 + 10)
    with pytest.raises(ConfigError, match="depth"):
        create_model("shortcut_linear", depth=7, shortcut=2)
    with pytest.raises(ConfigError, match="init"):
        create_model("shortcut_linear", init="he")


def test_inits():
    torch.manual_seed(0)
    m = create_model("shortcut_linear", depth=6, width=32, shortcut=2, init="zero")
    assert all(float(lay.weight.abs().max()) == 0 for b in m.blocks for lay in b.layers)
    w = m.stem[1].weight  # semi-orthogonal stem keeps the network non-zero
    torch.testing.assert_close(w @ w.T, torch.eye(32), atol=1e-5, rtol=0)
    m = create_model("shortcut_linear", depth=6, width=256, shortcut=2, init="small", scale=0.01)
    std = torch.cat([lay.weight.flatten() for b in m.blocks for lay in b.layers]).std()
    assert float(std) == pytest.approx(0.01 / 16, rel=0.05)
    m = create_model("shortcut_linear", depth=6, width=32, shortcut=2, init="orthogonal")
    w = m.blocks[0].layers[1].weight
    torch.testing.assert_close(w @ w.T, torch.eye(32), atol=1e-5, rtol=0)
    m = create_model("shortcut_mlp", depth=6, width=256, shortcut=2, init="xavier")
    assert float(m.blocks[0].layers[0].weight.std()) == pytest.approx((1 / 256) ** 0.5, rel=0.05)


def test_zero_init_is_identity_on_block_inputs():
    x = torch.randn(5, 1, D, dtype=torch.float64)
    lin = zero_net("shortcut_linear", 8, 2)
    torch.testing.assert_close(lin(x), lin.head(lin.stem(x)))
    mlp = zero_net("shortcut_mlp", 8, 2)
    torch.testing.assert_close(mlp(x), mlp.head(relu0(mlp.stem(x))))


def test_relu0_derivative_at_zero_is_one():
    z = torch.tensor([-1.0, 0.0, 2.0], requires_grad=True)
    relu0(z).sum().backward()
    assert z.grad.tolist() == [0.0, 1.0, 1.0]


@pytest.mark.parametrize("name", ["shortcut_linear", "shortcut_mlp"])
def test_k2_condition_number_is_depth_invariant(name):
    x, y = regression_problem()
    cns = []
    for depth in (4, 8, 12):
        lam = block_hessian_eigs(zero_net(name, depth, 2), x, y)
        cns.append(condition_numbers(lam)["condition_number"])
    assert cns[0] > 1.5  # a non-trivial problem
    for c in cns[1:]:
        assert c == pytest.approx(cns[0], rel=1e-6)


def test_k2_zero_hessian_spectrum_matches_theory():
    """Linear, k = 2: H has eigenvalues ±σ_i(M) (each `width` times) per block, where
    M = (1/N) Σ S x rᵀ Hd with residual r = y - Hd S x (S stem, Hd head)."""
    x, y = regression_problem()
    for depth in (4, 10):
        net = zero_net("shortcut_linear", depth, 2)
        s, hd = net.stem[1].weight.detach(), net.head.weight.detach()
        xs = x.flatten(1) @ s.T
        r = y - xs @ hd.T
        m = xs.T @ (r @ hd) / len(x)
        sv = torch.linalg.svdvals(m)
        n_blocks = (depth - 2) // 2
        expect = torch.sort(torch.cat([sv, -sv]).repeat_interleave(D).repeat(n_blocks)).values
        torch.testing.assert_close(block_hessian_eigs(net, x, y), expect, rtol=1e-9, atol=1e-10)


def test_k1_condition_number_grows_and_k3_hessian_vanishes():
    x, y = regression_problem()
    for name in ("shortcut_linear", "shortcut_mlp"):
        c = [condition_numbers(block_hessian_eigs(zero_net(name, 2 + n, 1), x, y))
             ["condition_number"] for n in (1, 4, 16)]
        assert c[0] < c[1] < c[2] and c[2] > 4 * c[0]
        lam = block_hessian_eigs(zero_net(name, 2 + 3 * 3, 3), x, y)
        assert float(lam.abs().max()) == 0.0


@pytest.mark.slow
def test_zero_init_study_reproduces_the_three_claims(tmp_path):
    from pnnh.reproduce.shortcut_depth import SCALES, zero_init_study

    rows = zero_init_study(SCALES["cpu"], 0, tmp_path)
    for variant in ("linear", "relu"):
        k2 = [r["condition_number"] for r in rows if r["variant"] == variant and r["shortcut"] == 2]
        assert max(k2) / min(k2) - 1 < 1e-6
        k1 = [r for r in rows if r["variant"] == variant and r["shortcut"] == 1]
        assert k1[-1]["condition_number"] > 100 * k1[0]["condition_number"]
        assert all(r["max_abs_eig"] == 0 for r in rows
                   if r["variant"] == variant and r["shortcut"] == 3)
    assert (tmp_path / "zero_init_hessian.csv").exists()
