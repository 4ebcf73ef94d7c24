"""Procrustes projection, ZCA whitening and the Procrustes ResNets (paper 2)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pnnh.errors import ConfigError
from pnnh.models import create_model
from pnnh.norm_preservation import (
    ProcrustesProjection,
    ZCAWhitening,
    make_norm_preserving,
    project_equal_singular_values,
    singular_value_spreads,
    transition_layers,
)


@pytest.mark.parametrize("shape", [(6, 6), (8, 3), (3, 8), (8, 4, 3, 3), (16, 8, 1, 1)])
def test_projection_has_equal_singular_values(shape):
    torch.manual_seed(0)
    w = torch.randn(*shape, dtype=torch.float64)
    p = project_equal_singular_values(w)
    assert p.shape == w.shape
    s = torch.linalg.svdvals(p.reshape(shape[0], -1))
    s0 = torch.linalg.svdvals(w.reshape(shape[0], -1))
    # (pnnh.orthogonal.procrustes computes its SVD in float32)
    assert torch.allclose(s, s.mean().expand_as(s), rtol=1e-6)
    assert s.mean() == pytest.approx(float(s0.mean()), rel=1e-6)  # the best common value


def _dist_best_scale(w: torch.Tensor, q: torch.Tensor) -> float:
    """min_c ‖w − c q‖ for a (semi-)orthogonal q: c = <w, q> / ‖q‖²."""
    c = (w * q).sum() / (q * q).sum()
    return float(torch.linalg.matrix_norm(w - c * q))


def test_projection_is_the_nearest_such_matrix_2x2_bruteforce():
    """Every 2x2 matrix with equal singular values is c·R(θ) or c·R(θ)·diag(1,-1); scan θ."""
    torch.manual_seed(1)
    thetas = torch.linspace(0, 2 * math.pi, 20001, dtype=torch.float64)
    for _ in range(5):
        w = torch.randn(2, 2, dtype=torch.float64)
        p = project_equal_singular_values(w)
        d_proj = float(torch.linalg.matrix_norm(w - p))
        best = math.inf
        for flip in (1.0, -1.0):
            c, s = torch.cos(thetas), torch.sin(thetas)
            q = torch.stack([torch.stack([c, -s * flip], -1), torch.stack([s, c * flip], -1)], -2)
            cs = (w * q).sum((-2, -1)) / 2  # optimal scale for each candidate
            d = torch.linalg.matrix_norm(w - cs[:, None, None] * q)
            best = min(best, float(d.min()))
        assert d_proj <= best + 1e-6
        assert best == pytest.approx(d_proj, abs=1e-6)


def test_projection_is_the_nearest_such_matrix_3x2_random_search():
    """Random search over semi-orthogonal 3x2 matrices (each with its best scale), refined
    around the best candidate: nothing beats the projection, and the search reaches it."""
    torch.manual_seed(2)
    w = torch.randn(3, 2, dtype=torch.float64)
    d_proj = float(torch.linalg.matrix_norm(w - project_equal_singular_values(w)))

    def orth(a):  # QR with R's diagonal made positive: a continuous map, so steps stay local
        q, r = torch.linalg.qr(a)
        return q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)

    def dists(q):
        cs = (w * q).sum((-2, -1)) / 2
        return torch.linalg.matrix_norm(w - cs[:, None, None] * q)

    q = orth(torch.randn(5000, 3, 2, dtype=torch.float64))
    d = dists(q)
    best, best_d = q[d.argmin()], float(d.min())
    assert best_d >= d_proj - 1e-6
    for step in (0.3, 0.1, 0.03, 0.01, 0.003, 0.001, 3e-4):
        cand = orth(best + step * torch.randn(2000, 3, 2, dtype=torch.float64))
        d = dists(cand)
        assert float(d.min()) >= d_proj - 1e-6
        if float(d.min()) < best_d:
            best, best_d = cand[d.argmin()], float(d.min())
    assert best_d == pytest.approx(d_proj, abs=1e-4)


def test_projected_1x1_conv_is_norm_preserving_operator():
    """For a 1x1 conv the projected matrix *is* the operator: ‖conv(x)‖ = c‖x‖ (tall W)."""
    torch.manual_seed(3)
    conv = nn.Conv2d(4, 8, 1, bias=False).double()
    proj = ProcrustesProjection([("c", conv)])
    proj.project()
    c = float(torch.linalg.svdvals(conv.weight.detach().reshape(8, 4))[0])
    x = torch.randn(5, 4, 6, 6, dtype=torch.float64)
    assert float(conv(x).norm()) == pytest.approx(c * float(x.norm()), rel=1e-6)
    assert float(torch.linalg.svdvals(conv.weight.detach().reshape(8, 4))[-1]) == pytest.approx(c, rel=1e-6)


def _correlated(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64)
    return torch.randn(n, d, generator=g, dtype=torch.float64) @ mix + 3.0


def test_zca_output_has_identity_covariance_on_the_fitting_batch():
    x = _correlated(500, 12)
    zca = ZCAWhitening(12, eps=1e-9).double().fit(x)
    zca.eval()
    y = zca(x)
    cov = torch.cov(y.T)
    assert torch.allclose(y.mean(0), torch.zeros(12, dtype=torch.float64), atol=1e-8)
    assert torch.allclose(cov, torch.eye(12, dtype=torch.float64), atol=1e-6)
    # Zero phase: the whitening matrix is symmetric (it rotates back to the input's axes).
    assert torch.allclose(zca.whitening, zca.whitening.T, atol=1e-10)
    # The default (relative eps) still whitens to close to identity.
    y2 = ZCAWhitening(12).double().fit(x).eval()(x)
    assert torch.allclose(torch.cov(y2.T), torch.eye(12, dtype=torch.float64), atol=0.05)


def test_zca_running_statistics_train_vs_eval():
    x = _correlated(400, 6, seed=1)
    zca = ZCAWhitening(6, momentum=0.5).double()
    zca.train()
    zca(x[:200])  # first batch sets the statistics
    assert torch.allclose(zca.running_mean, x[:200].mean(0))
    zca(x[200:])
    expect = 0.5 * x[:200].mean(0) + 0.5 * x[200:].mean(0)
    assert torch.allclose(zca.running_mean, expect)
    zca.eval()
    before = [b.clone() for b in zca.buffers()]
    out1 = zca(x[:10])
    zca(x[200:] * 5)  # eval never updates the statistics
    assert all(torch.equal(a, b) for a, b in zip(before, zca.buffers()))
    assert torch.equal(out1, zca(x[:10]))
    with pytest.raises(ValueError):
        zca(torch.randn(3, 5, dtype=torch.float64))


def test_procrustes_resnet_mlp_structure_and_projection_after_steps():
    torch.manual_seed(4)
    model = create_model("procrustes_resnet_mlp", depth=14, width=32)
    kinds = [type(b).__name__ for b in model.blocks]
    assert kinds.count("TransitionMLPBlock") == 2 and len(kinds) == 6
    assert [b.fc2.out_features for b in model.blocks] == [8, 8, 16, 16, 32, 32]
    names = [n for n, _ in transition_layers(model)]
    assert names == ["blocks.2.fc1", "blocks.2.fc2", "blocks.2.shortcut",
                     "blocks.4.fc1", "blocks.4.fc2", "blocks.4.shortcut"]
    assert "head.zca.running_cov" in model.state_dict()
    assert max(singular_value_spreads(model).values()) < 1e-5

    x, y = torch.randn(64, 1, 40), torch.randint(0, 10, (64,))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert max(singular_value_spreads(model).values()) > 1e-3  # the step broke the constraint
    hooks = [m for m in model.modules() if hasattr(m, "after_optimizer_step")]
    assert hooks == [model.procrustes]
    for m in hooks:
        m.after_optimizer_step()
    assert max(singular_value_spreads(model).values()) < 1e-5
    assert model(x).shape == (64, 10)

    base = create_model("procrustes_resnet_mlp", depth=14, width=32, procrustes=False, zca=False)
    assert not hasattr(base, "procrustes") and isinstance(base.head, nn.Linear)
    assert max(singular_value_spreads(base).values()) > 0.5


def test_make_norm_preserving_errors_name_the_field():
    with pytest.raises(ConfigError, match="procrustes: .*transition = True") as e:
        make_norm_preserving(create_model("plain_mlp", depth=4), procrustes=True, zca=False)
    assert e.value.field == "procrustes"
    with pytest.raises(ConfigError, match="zca") as e:
        make_norm_preserving(nn.Sequential(nn.Linear(2, 2)), procrustes=False, zca=True)
    assert e.value.field == "zca"
    m = make_norm_preserving(create_model("plain_mlp", depth=4), procrustes=False, zca=True)
    assert isinstance(m.head.zca, ZCAWhitening)


def test_procrustes_cifar_resnet20():
    torch.manual_seed(5)
    model = create_model("procrustes_resnet20", width=4)
    names = [n for n, _ in transition_layers(model)]
    assert "blocks.3.conv1" in names and "blocks.3.shortcut.0" in names
    assert model.blocks[3].conv1.stride == (2, 2)
    assert max(singular_value_spreads(model).values()) < 1e-5
    model.train()
    assert model(torch.randn(4, 3, 16, 16)).shape == (4, 10)
    assert isinstance(model.head[-1].zca, ZCAWhitening)


def test_reproduce_norm_preservation_quick(tmp_path):
    from pnnh.reproduce import norm_preservation as exp

    summary = exp.run(tmp_path, scale="quick", device="cpu", seed=0)
    for f in ("init_ratios.csv", "init_summary.json", "train_summary.csv", "train_curves.json",
              "procrustes_summary.csv", "init_ratios.png", "train_ratios.png", "procrustes.png"):
        assert (tmp_path / f).stat().st_size > 0, f
    models = {r["model"] for r in summary["init"]}
    assert {"plain_mlp", "resnet_mlp", "pnnh_mlp", "resnet20", "plain20", "pnnh20"} <= models
    resnet20 = next(r for r in summary["init"] if r["model"] == "resnet20")
    assert resnet20["transition_mean_abs_log_ratio"] is not None  # transitions are marked
    assert [r["variant"] for r in summary["procrustes"]] == ["resnet", "procrustes+zca"]
    assert all(0 <= r["final_val_acc"] <= 1 for r in summary["procrustes"])
    assert (tmp_path / "runs" / "proc-resnet" / "norms.jsonl").exists()
