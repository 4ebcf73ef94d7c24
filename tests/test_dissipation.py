"""The dissipation probe: known answers on hand-built nets, streaming = one pass, errors, CLI."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from pnnh.errors import PnnhError
from pnnh.models import create_model
from pnnh.probes.dissipation import METRICS, RIDGES, dissipation, split_parts


class Chain(nn.Module):
    """A hand-built net: ``blocks`` run one after the other."""

    def __init__(self, *blocks: nn.Module):
        super().__init__()
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x):
        return self.blocks(x)


def linear(d_in: int, d_out: int, weight=None, bias=None) -> nn.Linear:
    layer = nn.Linear(d_in, d_out)
    with torch.no_grad():
        layer.weight.copy_(torch.zeros(d_out, d_in) if weight is None else weight)
        layer.bias.copy_(torch.zeros(d_out) if bias is None else bias)
    return layer


def expected(h: np.ndarray, x: np.ndarray, seed: int = 0, tol: float = 1e-4) -> dict:
    """The four metrics straight from their definitions (numpy, float64, all rows at once)."""
    n, d = h.shape
    rms = math.sqrt((h**2).mean())
    live = h.std(0) > tol * rms
    surviving = ((np.abs(h) > tol * rms) & live[None]).mean()
    norms = np.linalg.norm(h, axis=1)
    u = np.where(norms[:, None] > 0, h / np.where(norms > 0, norms, 1)[:, None], 0)
    cos = u @ u.T
    zero = norms == 0
    cos[np.ix_(zero, zero)] = 1.0
    cosine = (cos.sum() - np.trace(cos)) / (n * (n - 1))
    sv = np.linalg.svd(h - h.mean(0), compute_uv=False)
    p = sv / sv.sum()
    p = p[p > 0]
    rank = float(np.exp(-(p * np.log(p)).sum()))
    part = split_parts(n, seed).numpy()
    f, v, t = part == 0, part == 1, part == 2
    mu_h, mu_x = h[f].mean(0), x[f].mean(0)
    hc, xc = h - mu_h, x - mu_x
    c_hh, c_hx = hc[f].T @ hc[f], hc[f].T @ xc[f]

    def sse(sel, r):
        lam = r * np.trace(c_hh) / d
        w = np.linalg.solve(c_hh + lam * np.eye(d), c_hx)
        return ((xc[sel] - hc[sel] @ w) ** 2).sum()

    best = min(RIDGES, key=lambda r: sse(v, r))
    r2 = 1 - sse(t, best) / (xc[t] ** 2).sum()
    return {"surviving_fraction": surviving, "input_r2": r2, "cosine_collapse": cosine,
            "effective_rank": rank}


def test_identity_layers_keep_the_input():
    torch.manual_seed(0)
    x = torch.randn(300, 12)
    recs = dissipation(Chain(nn.Identity(), nn.Identity(), nn.Identity()), x)
    assert [r["layer"] for r in recs] == ["blocks.0", "blocks.1", "blocks.2"]
    assert [r["depth"] for r in recs] == [1, 2, 3]  # no weight layers: positions
    for r in recs:
        assert r["input_r2"] > 0.999
        assert r["surviving_fraction"] == 1.0
        assert r["effective_rank"] > 10  # 12 near-isotropic directions


def test_a_layer_that_zeroes_everything_leaves_nothing():
    torch.manual_seed(0)
    x = torch.randn(200, 8)
    w = torch.randn(8, 8)
    net = Chain(linear(8, 8, w), nn.ReLU(), linear(8, 8), linear(8, 8, bias=torch.ones(8)))
    recs = {r["layer"]: r for r in dissipation(net, x)}
    assert recs["blocks.0"]["input_r2"] > 0.999  # an invertible linear map keeps everything
    zero, const = recs["blocks.2"], recs["blocks.3"]
    assert zero["input_r2"] == 0.0 and const["input_r2"] == 0.0
    assert zero["surviving_fraction"] == 0.0 and const["surviving_fraction"] == 0.0
    assert zero["effective_rank"] == 0.0 and const["effective_rank"] == 0.0
    assert zero["cosine_collapse"] == 1.0  # every input maps to the same (zero) vector
    assert const["cosine_collapse"] == pytest.approx(1.0)
    assert [recs[k]["depth"] for k in ("blocks.0", "blocks.1", "blocks.2", "blocks.3")] == [1, 1, 2, 3]


@pytest.mark.parametrize("n", [48, 400])  # 48 <= 64 features: rows kept; 400: sums of products
def test_metrics_match_their_definitions(n):
    torch.manual_seed(1)
    x = torch.randn(n, 10)
    w = torch.randn(64, 10)
    net = Chain(nn.Sequential(linear(10, 64, w, 0.3 * torch.randn(64)), nn.ReLU()))
    h = torch.relu(x @ w.T + net.blocks[0][0].bias).detach().double().numpy()
    want = expected(h, x.double().numpy())
    for batch_size in (n, 7):  # one pass or streamed in small batches: the same numbers
        (got,) = dissipation(net, x, batch_size=batch_size)
        for m in METRICS:
            assert got[m] == pytest.approx(want[m], rel=1e-4, abs=1e-5), (m, batch_size)


def test_relu_layer_keeps_about_half_of_its_units():
    torch.manual_seed(0)
    x = torch.randn(500, 30)
    net = Chain(nn.Sequential(nn.Linear(30, 256), nn.ReLU()))
    nn.init.zeros_(net.blocks[0][0].bias)
    (r,) = dissipation(net, x)
    assert abs(r["surviving_fraction"] - 0.5) < 0.03


def test_plain_net_dissipates_while_zero_init_residual_keeps_the_input():
    torch.manual_seed(0)
    x = torch.randn(400, 1, 40)
    plain = dissipation(create_model("plain_mlp", depth=62), x)
    resid = dissipation(create_model("resnet_mlp", depth=62, zero_init_residual=True), x)
    assert [r["depth"] for r in plain] == list(range(3, 62, 2))
    assert plain[0]["input_r2"] > 0.3 and plain[-1]["input_r2"] < 0.1
    assert plain[-1]["cosine_collapse"] > 0.98
    assert resid[-1]["input_r2"] == pytest.approx(resid[0]["input_r2"], abs=1e-3)
    assert resid[-1]["input_r2"] > 0.3


def test_wide_layers_are_sketched_and_default_layers_without_blocks():
    torch.manual_seed(0)
    x = torch.randn(64, 20)
    net = nn.Sequential(nn.Linear(20, 300), nn.ReLU(), nn.Linear(300, 5))
    recs = dissipation(net, x, max_features=50)
    assert [r["layer"] for r in recs] == ["0", "1", "2"]
    assert [r["depth"] for r in recs] == [1, 1, 2]
    for r in recs:
        assert all(math.isfinite(r[m]) for m in METRICS)
        assert r["effective_rank"] <= 50 + 1e-6


def test_layer_names_globs_and_errors():
    model = create_model("plain_mlp", depth=8)
    x = torch.randn(16, 1, 40)
    recs = dissipation(model, x, layers=["blocks.*.fc1", "stem"])
    assert [r["layer"] for r in recs] == ["stem", "blocks.0.fc1", "blocks.1.fc1", "blocks.2.fc1"]
    with pytest.raises(PnnhError) as e:
        dissipation(model, x, layers=["blocks.7"])
    assert "blocks.7" in str(e.value) and "blocks.0.fc1" in str(e.value) and "valid" in str(e.value)
    with pytest.raises(PnnhError, match="at least 4"):
        dissipation(model, x[:3])
    with pytest.raises(PnnhError, match="ridge"):
        dissipation(model, x, ridge=[0.0])


def test_runs_in_eval_mode_and_restores_the_model():
    model = nn.Sequential(nn.Linear(6, 32), nn.Dropout(0.5), nn.ReLU())
    model.train()
    x = torch.randn(40, 6)
    a, b = dissipation(model, x), dissipation(model, x)
    assert a == b  # dropout was off: two probes of the same batch agree exactly
    assert model.training
    assert all(not m._forward_hooks for m in model.modules())


def test_pnnh_block_depth_counts_its_two_layers():
    torch.manual_seed(0)
    model = create_model("pnnh_mlp", depth=12)
    recs = dissipation(model, torch.randn(200, 1, 40))
    assert [r["depth"] for r in recs] == [3, 5, 7, 9, 11]
    # zero-initialised learner decoder + orthogonal coder: the block is the identity
    assert recs[-1]["input_r2"] == pytest.approx(recs[0]["input_r2"], abs=1e-4)


def test_cli_writes_csv_json_png(tmp_path, capsys):
    from pnnh.cli import main

    out = tmp_path / "d"
    code = main(["probe", "dissipation", "--model", "plain_mlp", "--model", "resnet_mlp",
                 "--depth", "8", "--dataset", "digits", "--num-samples", "64", "--out", str(out)])
    assert code == 0
    rows = list(csv.DictReader(open(out / "dissipation.csv")))
    assert list(rows[0]) == ["model", "layer", "depth", *METRICS, "bn"]
    assert [r["model"] for r in rows] == ["plain_mlp-8"] * 3 + ["resnet_mlp-8"] * 3
    assert [int(r["depth"]) for r in rows] == [3, 5, 7] * 2
    assert len(json.loads((out / "dissipation.json").read_text())) == 6
    assert (out / "dissipation.png").read_bytes()[:4] == b"\x89PNG"

    code = main(["probe", "dissipation", "--model", "plain_mlp", "--depth", "8", "--dataset",
                 "digits", "--num-samples", "32", "--layers", "nope", "--out", str(out)])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope" in err[0] and "blocks.0" in err[0]


def test_reproduce_dissipation_small(tmp_path):
    from pnnh.reproduce import dissipation as experiment

    summary = experiment.run(tmp_path, "cpu", "cpu", 0, kinds=("plain", "pnnh"), depths=[4, 6],
                             epochs=1, width=32, num_samples=1000, probe_samples=64)
    assert set(summary["accuracy"]) == {"plain-4", "plain-6", "pnnh-4", "pnnh-6"}
    rows = list(csv.DictReader(open(tmp_path / "dissipation.csv")))
    assert {(r["kind"], r["model_depth"], r["phase"]) for r in rows} == {
        (k, d, p) for k in ("plain", "pnnh") for d in ("4", "6") for p in ("init", "trained")
    }
    theory_rows = list(csv.DictReader(open(tmp_path / "theory.csv")))
    assert {r["kind"] for r in theory_rows} == {"plain", "pnnh"}
    assert len(list(csv.DictReader(open(tmp_path / "accuracy.csv")))) == 4
    assert (tmp_path / "dissipation.png").read_bytes()[:4] == b"\x89PNG"
