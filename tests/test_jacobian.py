"""Jacobian probe: singular values against explicitly computed Jacobians."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from pnnh.probes.jacobian import (
    input_jacobians,
    jacobian_singular_values,
    summarize,
    top_singular_values,
)


def explicit_jacobian(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One sample at a time with torch.autograd.functional (double backward free)."""
    rows = []
    for xi in x:
        j = torch.autograd.functional.jacobian(lambda t: model(t[None]).reshape(-1), xi)
        rows.append(j.reshape(j.shape[0], -1))
    return torch.stack(rows)


@pytest.mark.parametrize("out_dim", [3, 40])  # jacrev (out < in) and jacfwd (out > in) paths
def test_singular_values_match_explicit_jacobian(out_dim):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, out_dim))
    model = model.double().eval()
    x = torch.randn(5, 2, 6, dtype=torch.float64)
    j = explicit_jacobian(model, x)
    torch.testing.assert_close(input_jacobians(model, x), j, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(jacobian_singular_values(model, x), torch.linalg.svdvals(j),
                               rtol=1e-10, atol=1e-12)


def test_power_method_top_singular_value():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 25)).double().eval()
    x = torch.randn(7, 20, dtype=torch.float64)
    exact = jacobian_singular_values(model, x)[:, 0]
    top = top_singular_values(model, x, iters=500, tol=1e-12)
    torch.testing.assert_close(top, exact, rtol=1e-6, atol=0)


def test_orthogonal_linear_net_is_isometric_and_summary():
    lin = nn.Linear(8, 8, bias=False).double()
    nn.init.orthogonal_(lin.weight)
    model = nn.Sequential(lin, nn.Linear(8, 8, bias=False).double())
    nn.init.orthogonal_(model[1].weight)
    x = torch.randn(4, 8, dtype=torch.float64)
    s = summarize(jacobian_singular_values(model, x))
    assert s["mean_sq_singular_value"] == pytest.approx(1.0, abs=1e-12)
    assert s["sv_max"] == pytest.approx(1.0) and s["sv_min"] == pytest.approx(1.0)
    assert s["spread"] == pytest.approx(1.0) and s["log_sv_std"] < 1e-10
    # a scaled diagonal map: σ = (1, 2, 4) -> mean σ² = 7, spread 4
    d = nn.Linear(3, 3, bias=False).double()
    with torch.no_grad():
        d.weight.copy_(torch.diag(torch.tensor([1.0, 2.0, 4.0])))
    s = summarize(jacobian_singular_values(d, torch.randn(2, 3, dtype=torch.float64)))
    assert s["mean_sq_singular_value"] == pytest.approx(7.0)
    assert s["spread"] == pytest.approx(4.0)


def test_cli_writes_jacobian_files(tmp_path):
    pytest.importorskip("pnnh.probes.common")
    from pnnh.cli import main

    out = tmp_path / "j"
    rc = main(["probe", "jacobian", "--model", "plain_mlp", "--model", "resnet_mlp",
               "--depth", "6", "--width", "16", "--num-samples", "16", "--out", str(out)])
    assert rc == 0
    rows = json.loads((out / "jacobian.json").read_text())
    assert [r["model"] for r in rows] == ["plain_mlp-6", "resnet_mlp-6"]
    assert all(r["sv_max"] >= r["sv_min"] > 0 for r in rows)
    assert (out / "jacobian.csv").exists() and (out / "jacobian.png").stat().st_size > 1000
