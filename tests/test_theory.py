"""Mean-field theory of dissipation at initialisation, checked against math and Monte Carlo.

Monte-Carlo nets have width 1024 and 64 inputs; the finite-width fluctuation of a mean
cosine or an active share is O(1/sqrt(width)) ~ 0.03, the tolerance used here.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from pnnh.models import create_model
from pnnh.probes import theory
from pnnh.probes.dissipation import dissipation

WIDTH, N, RHO0, TOL = 1024, 64, 0.2, 0.03


def test_relu_kernel_is_the_gaussian_expectation():
    rng = np.random.default_rng(0)
    z = rng.standard_normal((2, 2_000_000))
    for rho in (-0.8, 0.0, 0.3, 0.9):
        u2 = rho * z[0] + math.sqrt(1 - rho**2) * z[1]
        mc = (np.maximum(z[0], 0) * np.maximum(u2, 0)).mean() / 0.5
        assert theory.relu_kernel(rho) == pytest.approx(mc, abs=3e-3)
    assert theory.relu_kernel(1.0) == pytest.approx(1.0)
    assert theory.relu_kernel(0.0) == pytest.approx(1 / math.pi)
    rho = np.linspace(-1, 0.999, 50)
    assert np.all(theory.relu_kernel(rho) > rho)  # every layer pulls inputs together


def test_plain_net_degenerates_with_the_predicted_rate_and_no_floor():
    curve = theory.plain_curves(10_000, 0.0)
    gaps = np.array([1 - c["correlation"] for c in curve])
    assert np.all(np.diff(gaps) < 0)
    ratio = gaps[-1] / theory.plain_gap_asymptote(10_000)
    assert ratio == pytest.approx(1.0, abs=0.01)
    assert all(c["surviving_fraction"] == 0.5 for c in curve)


def test_identity_path_keeps_a_lower_bound():
    for alpha in (1.0, 0.3):
        curve = theory.preact_residual_curves(200, 0.0, alpha=alpha)
        gap0 = 1 - curve[0]["correlation"]
        for b, c in enumerate(curve):
            assert 1 - c["correlation"] >= theory.residual_gap_bound(gap0, alpha, b) - 1e-12
    # alpha^2 = 1/L keeps a depth-independent floor; a plain net of the same depth has none
    L = 400
    deep = theory.preact_residual_curves(L, 0.0, alpha=math.sqrt(1 / L))
    assert 1 - deep[-1]["correlation"] > (1 - deep[0]["correlation"]) * math.exp(-2) - 1e-12
    assert 1 - theory.plain_curves(2 * L + 1)[-1]["correlation"] < 1e-3
    # zero-initialised PNNH learner: the correlation and active share never move
    pnnh = theory.pnnh_curves(50, 0.0, learner_scale=0.0, particles=20_000)
    assert {round(c["correlation"], 12) for c in pnnh} == {round(pnnh[0]["correlation"], 12)}
    # post-activation residual: more than half of the units stay active (h >= 0 helps)
    resnet = theory.residual_curves(20, 0.0, particles=50_000)
    assert all(c["surviving_fraction"] > 0.55 for c in resnet[1:])


def inputs(seed: int = 0):
    """N inputs of dimension WIDTH whose pairwise cosines are about RHO0."""
    g = torch.Generator().manual_seed(seed)
    z0 = torch.randn(WIDTH, generator=g)
    x = math.sqrt(RHO0) * z0 + math.sqrt(1 - RHO0) * torch.randn(N, WIDTH, generator=g)
    u = x / x.norm(dim=1, keepdim=True)
    cos = (u @ u.T).double().numpy()
    return x, cos[~np.eye(N, dtype=bool)]


def compare(records, curve, surviving=True):
    by_depth = {c["depth"]: c for c in curve}
    assert records
    for r in records:
        t = by_depth[r["depth"]]
        assert abs(r["cosine_collapse"] - t["correlation"]) < TOL, (r, t)
        if surviving:
            assert abs(r["surviving_fraction"] - t["surviving_fraction"]) < TOL, (r, t)


def test_plain_theory_matches_random_wide_nets():
    x, cos = inputs()
    torch.manual_seed(0)
    model = create_model("plain_mlp", in_shape=(WIDTH,), depth=16, width=WIDTH)
    compare(dissipation(model, x), theory.curves("plain", 16, cos))


def test_post_activation_resnet_theory_matches_random_wide_nets():
    x, cos = inputs(1)
    torch.manual_seed(1)
    model = create_model("resnet_mlp", in_shape=(WIDTH,), depth=16, width=WIDTH,
                         zero_init_residual=False)  # the He-init ResNet of the theory
    compare(dissipation(model, x), theory.curves("resnet", 16, cos.mean(), particles=100_000))


class PreactBlock(nn.Module):
    def __init__(self, width: int, alpha: float):
        super().__init__()
        self.fc1, self.fc2, self.alpha = nn.Linear(width, width), nn.Linear(width, width), alpha
        for fc in (self.fc1, self.fc2):
            nn.init.kaiming_normal_(fc.weight, nonlinearity="relu")
            nn.init.zeros_(fc.bias)

    def forward(self, h):
        return h + self.alpha * self.fc2(torch.relu(self.fc1(h)))


class PNNHBlockByHand(nn.Module):
    """``relu([A^T, -A^T, D] relu([A; -A; E] h))``, written as two plain Linear layers."""

    def __init__(self, width: int, learner_scale: float):
        super().__init__()
        a = torch.linalg.qr(torch.randn(width, width))[0]
        e = torch.randn(width, width) * math.sqrt(2 / width)
        d = torch.randn(width, width) * math.sqrt(2 / width) * learner_scale
        self.l1 = nn.Linear(width, 3 * width, bias=False)
        self.l2 = nn.Linear(3 * width, width, bias=False)
        with torch.no_grad():
            self.l1.weight.copy_(torch.cat([a, -a, e], 0))
            self.l2.weight.copy_(torch.cat([a.T, -a.T, d], 1))

    def forward(self, h):
        return torch.relu(self.l2(torch.relu(self.l1(h))))


def stem_then(blocks):
    stem = nn.Sequential(nn.Linear(WIDTH, WIDTH, bias=False), nn.ReLU())
    nn.init.kaiming_normal_(stem[0].weight, nonlinearity="relu")

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.blocks = stem, nn.Sequential(*blocks)

        def forward(self, x):
            return self.blocks(self.stem(x))

    return Net()


def test_preact_residual_theory_matches_random_wide_nets():
    x, cos = inputs(2)
    torch.manual_seed(2)
    net = stem_then([PreactBlock(WIDTH, 1.0) for _ in range(8)])
    recs = dissipation(net, x)
    compare(recs, theory.curves("resnet_preact", 18, cos, alpha=1.0), surviving=False)


@pytest.mark.parametrize("scale", [0.0, 1.0])
def test_pnnh_theory_matches_random_wide_nets(scale):
    x, cos = inputs(3)
    torch.manual_seed(3)
    net = stem_then([PNNHBlockByHand(WIDTH, scale) for _ in range(6)])
    recs = dissipation(net, x)
    compare(recs, theory.curves("pnnh", 14, cos.mean(), learner_scale=scale, particles=100_000))
