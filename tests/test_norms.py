"""The gradient-norm probe (paper 2) and its training callback."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pnnh.errors import ConfigError
from pnnh.io import read_jsonl
from pnnh.models import create_model
from pnnh.probes.norms import NormTracker, norms, plot, resolve_blocks, summarize


class Chain(nn.Module):
    def __init__(self, blocks: list[nn.Module], d: int, classes: int = 5):
        super().__init__()
        self.stem = nn.Identity()
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


def _orthogonal_linear(d: int) -> nn.Linear:
    layer = nn.Linear(d, d, bias=False, dtype=torch.float64)
    nn.init.orthogonal_(layer.weight)  # orthogonal to float64 precision
    return layer


def test_orthogonal_linear_block_has_ratio_exactly_one():
    torch.manual_seed(0)
    d = 16
    model = Chain([_orthogonal_linear(d) for _ in range(3)], d).double()
    x, y = torch.randn(32, d, dtype=torch.float64), torch.randint(0, 5, (32,))
    records = norms(model, (x, y))
    assert [r["block"] for r in records] == ["blocks.0", "blocks.1", "blocks.2"]
    for r in records:
        assert r["ratio"] == pytest.approx(1.0, abs=1e-12)
    # A non-orthogonal layer is not norm-preserving: its ratio moves away from 1.
    scaled = Chain([nn.Linear(d, d, bias=False)], d).double()
    with torch.no_grad():
        scaled.blocks[0].weight.copy_(0.5 * torch.eye(d))
    assert norms(scaled, (x, y))[0]["ratio"] == pytest.approx(0.5, abs=1e-12)


def test_norms_match_gradients_computed_by_hand():
    torch.manual_seed(1)
    model = create_model("plain_mlp", depth=8, width=32).double()
    x, y = torch.randn(64, 1, 40, dtype=torch.float64), torch.randint(0, 10, (64,))
    records = norms(model, (x, y))
    assert len(records) == 3

    # Manual: run the layers one by one, retain grads on each block boundary.
    h = model.stem(x)
    acts = [h]
    for b in model.blocks:
        h = b(h)
        acts.append(h)
    for a in acts:
        a.retain_grad()
    F.cross_entropy(model.head(h), y).backward()
    for i, r in enumerate(records):
        assert r["grad_in_norm"] == pytest.approx(float(acts[i].grad.norm()), rel=1e-10)
        assert r["grad_out_norm"] == pytest.approx(float(acts[i + 1].grad.norm()), rel=1e-10)
        assert r["ratio"] == pytest.approx(r["grad_in_norm"] / r["grad_out_norm"])
    # Consecutive blocks share a boundary tensor.
    for a, b in zip(records, records[1:]):
        assert a["grad_out_norm"] == b["grad_in_norm"]


def test_norms_leave_parameter_grads_alone():
    torch.manual_seed(2)
    model = create_model("resnet_mlp", depth=6, width=16)
    x, y = torch.randn(8, 1, 40), torch.randint(0, 10, (8,))
    norms(model, (x, y))
    assert all(p.grad is None for p in model.parameters())
    F.cross_entropy(model(x), y).backward()
    before = [p.grad.clone() for p in model.parameters()]
    norms(model, (x, y))
    for p, g in zip(model.parameters(), before):
        assert torch.equal(p.grad, g)


def test_named_blocks_and_errors():
    torch.manual_seed(3)
    model = create_model("plain_mlp", depth=6, width=16)
    x, y = torch.randn(8, 1, 40), torch.randint(0, 10, (8,))
    records = norms(model, (x, y), blocks=["blocks.1.fc1", "head"])
    assert [r["block"] for r in records] == ["blocks.1.fc1", "head"]
    assert all(r["ratio"] > 0 for r in records)
    with pytest.raises(ConfigError, match="no submodule 'blocks.9'"):
        resolve_blocks(model, ["blocks.9"])
    with pytest.raises(ConfigError, match="no blocks found in Linear"):
        resolve_blocks(nn.Linear(3, 3))
    # A first block fed straight from the data is measured too (the input requires grad).
    raw = Chain([nn.Tanh(), nn.Tanh()], 40)
    first = norms(raw, (torch.randn(8, 40), torch.randint(0, 5, (8,))))[0]
    assert first["grad_in_norm"] > 0


class _BNDropNet(nn.Module):
    """Buffers (BatchNorm running stats) and randomness (dropout): what a probe could disturb."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Flatten(), nn.Linear(40, 24), nn.ReLU())
        self.blocks = nn.Sequential(
            *[nn.Sequential(nn.Linear(24, 24), nn.BatchNorm1d(24), nn.ReLU(), nn.Dropout(0.2))
              for _ in range(3)]
        )
        self.head = nn.Linear(24, 10)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


def _train(model, data, tracker=None, steps=6):
    torch.manual_seed(123)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train()
    for step in range(steps):
        x, y = data[step % len(data)]
        if tracker is not None:
            tracker.on_step(step, 0, model, x, y, F.cross_entropy)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if tracker is not None:  # also mid-step, between backward and the optimizer step
            tracker.on_step(step, 0, model, x, y, F.cross_entropy)
        opt.step()
    return model


def test_norm_tracker_writes_jsonl_and_does_not_change_training(tmp_path):
    torch.manual_seed(4)
    data = [(torch.randn(16, 1, 40), torch.randint(0, 10, (16,))) for _ in range(3)]
    base = _BNDropNet()
    plain = _train(copy.deepcopy(base), data)
    tracker = NormTracker(every=2, path=tmp_path)
    tracked = _train(copy.deepcopy(base), data, tracker)

    for (n, a), b in zip(plain.state_dict().items(), tracked.state_dict().values()):
        assert torch.equal(a, b), f"{n} differs when norms are tracked"

    lines = read_jsonl(tmp_path / "norms.jsonl")
    # steps 0, 2, 4 measured twice each (before and after backward), 3 blocks each
    assert len(lines) == 3 * 2 * 3 == len(tracker.records)
    assert {r["step"] for r in lines} == {0, 2, 4}
    assert set(lines[0]) == {"step", "epoch", "block", "grad_in_norm", "grad_out_norm", "ratio"}
    assert all(r["ratio"] > 0 for r in lines)
    json.dumps(lines)
    # A .jsonl path is used as is.
    t2 = NormTracker(every=1, path=tmp_path / "x" / "mine.jsonl")
    t2.on_step(0, 0, _BNDropNet(), *data[0])
    assert len(read_jsonl(tmp_path / "x" / "mine.jsonl")) == 3
    with pytest.raises(ConfigError):
        NormTracker(every=0, path=tmp_path)


def test_summarize_and_plot(tmp_path):
    recs = [{"index": i, "block": f"b{i}", "ratio": r, "model": "m"} for i, r in enumerate([1, 2])]
    s = summarize(recs)
    assert s["mean_ratio"] == 1.5
    assert s["mean_abs_log_ratio"] == pytest.approx(0.5 * torch.log(torch.tensor(2.0)).item())
    path = plot(recs, tmp_path / "n.png")
    assert path.stat().st_size > 1000


def test_probe_norms_cli(tmp_path):
    pytest.importorskip("pnnh.probes.common")
    from pnnh.cli import main

    out = tmp_path / "probe"
    rc = main(["probe", "norms", "--model", "plain_mlp", "--model", "resnet_mlp", "--depth", "6",
               "--width", "16", "--num-samples", "64", "--out", str(out)])
    assert rc == 0
    header = (out / "norms.csv").read_text().splitlines()[0]
    assert header == "model,block,grad_in_norm,grad_out_norm,ratio,bn"
    assert {r["bn"] for r in json.loads((out / "norms.json").read_text())} == {"none"}
    rows = json.loads((out / "norms.json").read_text())
    labels = [r["model"] for r in rows]
    assert len(rows) == 4 and len(set(labels)) == 2 and labels[0] != labels[-1]
    assert "plain_mlp" in labels[0] and "resnet_mlp" in labels[-1]
    assert (out / "norms.png").stat().st_size > 1000
