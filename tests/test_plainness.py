"""Plainness: the torch.fx checker finds every skip, and registered plain/PNNH models have none."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pnnh
from pnnh.errors import ConfigError
from pnnh.export import to_plain
from pnnh.models import model_info
from pnnh.plainness import (
    NotPlainError,
    assert_plain,
    block_names,
    check_plainness,
    count_skips,
    find_skips,
)

# --------------------------------------------------------------------------- the checker


class Chain(nn.Module):
    def __init__(self, *blocks: nn.Module, head: nn.Module | None = None):
        super().__init__()
        self.blocks = nn.Sequential(*blocks)
        self.head = head or nn.Identity()

    def forward(self, x):
        return self.head(self.blocks(x))


class PlainBlock(nn.Module):
    def __init__(self, d=6):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        return torch.relu(self.fc2(torch.relu(self.fc1(x))))


class AddSkip(PlainBlock):
    def forward(self, x):
        return torch.relu(x + self.fc2(torch.relu(self.fc1(x))))


class CatSkip(PlainBlock):
    def forward(self, x):  # DenseNet-style: the input is kept and concatenated
        return torch.cat([x, self.fc2(torch.relu(self.fc1(x)))], -1)[..., ::2]


class NormSkip(PlainBlock):
    def __init__(self, d=6):
        super().__init__(d)
        self.ln = nn.LayerNorm(d)

    def forward(self, x):  # a LayerNorm on the shortcut does not make it a layer
        return self.ln(x) + self.fc2(torch.relu(self.fc1(x)))


class ProjectionShortcut(PlainBlock):
    def __init__(self, d=6):
        super().__init__(d)
        self.short = nn.Linear(d, d)

    def forward(self, x):  # through the block's own layer: an internal path, not reported
        return torch.relu(self.short(x) + self.fc2(torch.relu(self.fc1(x))))


class ShapesOnly(PlainBlock):
    def forward(self, x):  # x's shape and dtype are used after the layers, not its values
        y = self.fc2(torch.relu(self.fc1(x))).reshape(x.shape[0], -1)
        return y + torch.zeros_like(x).view_as(y)


class SharedCoder(nn.Module):
    """[A; -A] / [Aᵀ, -Aᵀ] as tensors computed from one parameter: still layers."""

    def __init__(self, d=6):
        super().__init__()
        self.a = nn.Parameter(torch.linalg.qr(torch.randn(d, d))[0])

    def forward(self, x):
        h = torch.relu(F.linear(x, torch.cat([self.a, -self.a])))
        return torch.relu(h @ torch.cat([self.a, -self.a]))


class Untraceable(nn.Module):
    def __init__(self, d=6):
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        if x.sum() > 1e9:  # control flow on values: torch.fx cannot trace it
            return x
        return self.fc(x)


X = torch.randn(4, 6)


def test_plain_chain_has_no_skips():
    assert find_skips(Chain(PlainBlock(), PlainBlock(), head=nn.Linear(6, 3)), X) == []
    assert find_skips(Chain(SharedCoder(), SharedCoder()), X) == []


@pytest.mark.parametrize("block", [AddSkip, CatSkip, NormSkip])
def test_skips_inside_blocks_are_found_once_per_block(block):
    model = Chain(block(), block(), block(), head=nn.Linear(6, 3))
    skips = find_skips(model, X)
    assert [s.block for s in skips] == ["blocks.0", "blocks.1", "blocks.2"]
    assert skips[0].source == "x"  # the model input is block 0's input
    assert skips[0].shape == (4, 6)
    assert skips[0].kind == "identity" and skips[0].layers == (0, 2)
    assert skips[0].sink in ("add", "cat")  # the merge itself


def test_skip_around_blocks_at_model_level_is_found():
    class Dense(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.Sequential(PlainBlock(), PlainBlock())
            self.head = nn.Linear(12, 3)

        def forward(self, x):
            return self.head(torch.cat([x, self.blocks(x)], -1))

    (skip,) = find_skips(Dense(), X)  # one connection, around both blocks
    assert skip.block == "blocks.0..blocks.1" and skip.source == "x" and skip.sink == "cat"
    assert skip.layers == (0, 4)


def test_projection_shortcuts_are_reported_shapes_and_zeros_like_are_not():
    skips = find_skips(Chain(ProjectionShortcut(), ProjectionShortcut()), X)
    assert [(s.block, s.kind, s.layers) for s in skips] == [
        ("blocks.0", "projection", (1, 2)), ("blocks.1", "projection", (1, 2))]
    assert skips[0].path == ("blocks.0.short (Linear)",) and skips[0].source == "x"
    assert "projection, 1 vs 2 layers" in str(skips[0])
    assert find_skips(Chain(ShapesOnly(), ShapesOnly()), X) == []


def test_equal_depth_branches_are_plain_and_a_gate_is_not():
    class Glu(PlainBlock):  # act(W1 x) * W2 x: one layer on each side
        def forward(self, x):
            return torch.relu(self.fc1(x)) * self.fc2(x)

    class Gate(PlainBlock):  # x * sigmoid(W2 relu(W1 x)): the input is carried (SE-style)
        def forward(self, x):
            return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(x))))

    assert find_skips(Chain(Glu(), Glu()), X) == []
    assert [s.layers for s in find_skips(Chain(Gate(), Glu()), X)] == [(0, 2)]


def test_without_blocks_the_top_level_children_are_the_blocks():
    seq = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), AddSkip(), nn.LayerNorm(6), nn.Linear(6, 2))
    assert block_names(seq) == ["0", "1", "2", "3", "4"]
    assert [s.block for s in find_skips(seq, X)] == ["2"]


def test_nested_stages_are_checked_block_by_block():
    model = Chain(nn.Sequential(AddSkip(), PlainBlock()), nn.Sequential(PlainBlock(), AddSkip()))
    assert block_names(model)[:4] == ["blocks.0.0", "blocks.0.1", "blocks.1.0", "blocks.1.1"]
    assert [s.block for s in find_skips(model, X)] == ["blocks.0.0", "blocks.1.1"]


def test_assert_plain_names_the_skips_and_the_model_state_is_kept():
    model = Chain(AddSkip(), nn.BatchNorm1d(6))
    model.train()
    before = model.blocks[1].running_mean.clone()
    with pytest.raises(NotPlainError, match=r"blocks\.0: x"):
        assert_plain(model, X)
    assert model.training
    torch.testing.assert_close(model.blocks[1].running_mean, before)  # no BN update
    assert_plain(Chain(PlainBlock()), X)


def test_untraceable_submodule_is_reported_unverified_never_plain():
    model = Chain(PlainBlock(), Untraceable(), PlainBlock())
    with pytest.warns(UserWarning, match="blocks.1"):
        skips = find_skips(model, X)
    assert [(s.block, s.kind) for s in skips] == [("blocks.1", "unverified")]
    with pytest.warns(UserWarning), pytest.raises(NotPlainError, match="blocks.1: unverified"):
        assert_plain(model, X)


# --------------------------------------------------------------------------- the registry


def _small(name: str):
    """The registered model at its default depth and in_shape, with a narrow width if it
    accepts one (a model that needs its defaults keeps them)."""
    info = model_info(name)
    params = inspect.signature(info.factory).parameters
    shape = info.defaults.get("in_shape", params["in_shape"].default)
    model = None
    if "width" in params:
        try:
            model = pnnh.create_model(name, width=8)
        except ConfigError:
            model = None
    if model is None:
        model = pnnh.create_model(name)
    torch.manual_seed(0)
    return model, torch.randn(2, *shape)


PLAIN = pnnh.list_models(kind="plain")
PNNH = pnnh.list_models(kind="pnnh")
PNNH_FIXED = [n for n in PNNH if "vit" not in n]  # default coder_constraint="fixed"
PLAIN_AND_PNNH = PLAIN + PNNH
RESNETS = pnnh.list_models(kind="resnet")


def test_registry_has_models_of_each_kind():
    assert "plain_mlp" in PLAIN_AND_PNNH and "resnet_mlp" in RESNETS


def _plain_form(model: nn.Module) -> nn.Module:
    """PNNH blocks in their plain form (``fused=False``: ``[A; -A; E]``, ReLU, ``[Aᵀ, -Aᵀ, D]``)."""
    for m in model.modules():
        if hasattr(m, "fused"):
            m.fused = False
    return model


@pytest.mark.filterwarnings("ignore:plainness")
@pytest.mark.parametrize("name", PLAIN + [n for n in PNNH if n not in PNNH_FIXED])
def test_plain_models_have_no_skips(name):
    model, x = _small(name)
    assert_plain(_plain_form(model), x)


@pytest.mark.filterwarnings("ignore:plainness")
@pytest.mark.parametrize("name", ["pnnh_mlp", "pnnh_cnn1d", "pnnh20"])
def test_pnnh_training_form_is_not_claimed_plain_and_its_export_is(name):
    """The training form computes the coder path by the reparametrization AᵀA x: whatever the
    checker sees there (an identity/projection add, or a module it cannot trace) is not plain;
    the exported network is."""
    model, x = _small(name)
    assert find_skips(model, x), "the training form must not pass as plain"
    assert_plain(pnnh.to_plain(model), x)


def _small_pnnh(name: str, **kw):
    shape = model_info(name).defaults.get("in_shape") or inspect.signature(
        model_info(name).factory).parameters["in_shape"].default
    torch.manual_seed(0)
    return pnnh.create_model(name, width=8, **kw), torch.randn(2, *shape)


@pytest.mark.filterwarnings("ignore:plainness")
@pytest.mark.parametrize("name", PNNH_FIXED)
def test_pnnh_plain_form_and_export_have_no_skips(name):
    """``fused=False`` materializes the coder pair ``[A; -A]``: a straight chain of layers."""
    model, x = _small_pnnh(name, fused=False)
    assert_plain(model, x)
    assert_plain(to_plain(model), x)


@pytest.mark.filterwarnings("ignore:plainness")
@pytest.mark.parametrize("name", PNNH_FIXED)
def test_pnnh_default_training_form_is_reported_as_residual(name):
    """The fused form with a fixed coder computes ``x + learner(x)`` literally (``AᵀA x = x``
    is not computed): the checker must see an identity skip in every non-transition block —
    this *is* the equivalence of docs/PNNH.md, written as code. A transition's ``P x`` is a
    projection shortcut and is reported as one."""
    model, x = _small_pnnh(name)
    kinds = {s.block: s.kind for s in find_skips(model, x)}
    expected = {f"blocks.{i}": "projection" if b.transition else "identity"
                for i, b in enumerate(model.blocks)}
    assert kinds == expected


@pytest.mark.filterwarnings("ignore:plainness")
@pytest.mark.parametrize("name", RESNETS)
def test_the_same_check_finds_the_resnet_skips(name):
    """Every block has its residual connection(s): identity where the block keeps its
    input's shape, projection (1x1 conv / linear + norm) in transition blocks."""
    model, x = _small(name)
    shapes = {}
    hooks = [
        model.get_submodule(b).register_forward_hook(
            lambda m, i, o, b=b: shapes.__setitem__(b, (tuple(i[0].shape), tuple(o.shape)))
        )
        for b in block_names(model)
        if b.startswith("blocks.")
    ]
    model.eval()
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    skips = [s for s in find_skips(model, x) if s.kind != "unverified"]
    per_block = [s.block for s in skips]
    assert len({(s.block, s.source, s.sink) for s in skips}) == len(skips), "each listed once"
    identity_blocks = {b for b, (i, o) in shapes.items() if i == o}
    assert identity_blocks, "a ResNet has identity blocks"
    assert set(per_block) == set(shapes)  # every block, transitions included; stem/head plain
    for s in skips:
        assert s.kind == ("identity" if s.block in identity_blocks else "projection"), s



def test_a_block_called_twice_is_checked_at_both_calls():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.Sequential(PlainBlock(), AddSkip())

        def forward(self, x):
            return self.blocks[1](self.blocks[0](self.blocks[1](x)))

    skips = find_skips(Twice(), X)
    assert [s.block for s in skips] == ["blocks.1", "blocks.1"]
    assert skips[0].source == "x" and skips[1].source != "x"


# --------------------------------------------------------------------------- gates


class SqueezeExcite(PlainBlock):
    """x * sigmoid(W2 relu(W1 pool(x))): the input is carried and scaled (SE / MobileNetV3)."""

    def forward(self, x):
        s = torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean(0, keepdim=True)))))
        return x * s


class SEResidual(PlainBlock):
    """A residual block with an SE gate inside: one addition, one product."""

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        h = h * F.hardsigmoid(self.fc2(h.mean(0, keepdim=True)))
        return x + h


class RMSNormBlock(PlainBlock):
    """Llama's RMSNorm written out (x * rsqrt(mean(x²)), then weight * x), then a layer."""

    def __init__(self, d=6):
        super().__init__(d)
        self.w = nn.Parameter(torch.ones(d))

    def forward(self, x):
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        return torch.relu(self.fc1(self.w * h))


def test_gates_are_their_own_kind_and_not_counted_as_residual():
    skips = find_skips(Chain(SqueezeExcite(), SEResidual(), PlainBlock()), X)
    assert [(s.block, s.kind, s.layers) for s in skips] == [
        ("blocks.0", "gate", (0, 2)), ("blocks.1", "gate", (0, 1)),
        ("blocks.1", "identity", (0, 2))]
    assert count_skips(skips) == {"residual": 1, "gate": 2, "unverified": 0}
    assert [s.residual for s in skips] == [False, False, True]
    assert "gate, 0 vs 2 layers" in str(skips[0])
    with pytest.raises(NotPlainError, match=r"1 residual connection\(s\), 2 gate\(s\)"):
        assert_plain(Chain(SqueezeExcite(), SEResidual()), X)


def test_glu_of_equal_depth_and_a_written_out_rmsnorm_are_plain():
    class Glu(PlainBlock):  # silu(W1 x) * W2 x (Llama's MLP): one layer on each side
        def forward(self, x):
            return F.silu(self.fc1(x)) * self.fc2(x)

    class DeepGlu(PlainBlock):  # relu(W2 relu(W1 x)) * x: the sides differ: a gate
        def forward(self, x):
            return torch.relu(self.fc2(torch.relu(self.fc1(x)))) * x

    for capture in ("fx", "export"):
        assert find_skips(Chain(Glu(), RMSNormBlock(), Glu()), X, capture=capture) == []
        (gate,) = find_skips(Chain(Glu(), DeepGlu()), X, capture=capture)
        assert (gate.block, gate.kind, gate.layers, gate.capture) == (
            "blocks.1", "gate", (0, 2), capture)


# --------------------------------------------------------------------------- torch.export


class LoopOverBatch(AddSkip):
    """A residual block fx cannot trace (``range`` of a traced shape); torch.export can."""

    def forward(self, x):
        rows = [x[i] for i in range(x.shape[0])]
        return torch.stack(rows) + self.fc2(torch.relu(self.fc1(x)))


class DictOut(nn.Module):
    """A model fx cannot trace at the root (``len(x)``) returning a dict with a non-tensor
    (a cache object), as Hugging Face models return a ``ModelOutput``."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(AddSkip(), PlainBlock(), NormSkip())
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        assert len(x) > 0
        return {"logits": self.head(self.blocks(x)), "cache": object(), "n": len(x)}


def test_a_model_fx_cannot_trace_is_captured_with_torch_export():
    report = check_plainness(DictOut(), X)
    assert report.capture == "export" and "torch.fx" in report.note
    assert [(s.block, s.kind, s.layers, s.capture) for s in report.skips] == [
        ("blocks.0", "identity", (0, 2), "export"), ("blocks.2", "identity", (0, 2), "export")]
    assert report.skips[0].source == "x" and report.skips[0].shape == (4, 6)
    assert "blocks.2.ln (LayerNorm): layer_norm" not in str(report.skips[1])  # labels: path: node
    assert report.skips[1].path == ("blocks.2.ln: layer_norm",)
    assert report.summary() == "2 residual connection(s) [torch.export]"


def test_an_untraceable_block_is_seen_by_torch_export_not_left_unverified():
    model = Chain(PlainBlock(), LoopOverBatch(), PlainBlock())
    report = check_plainness(model, X)  # fx leaves blocks.1 opaque; export sees it all
    assert report.capture == "export" and "blocks.1" in report.note
    assert [(s.block, s.kind) for s in report.skips] == [("blocks.1", "identity")]
    with pytest.warns(UserWarning, match="blocks.1"):
        fx_only = find_skips(model, X, capture="fx")
    assert [(s.block, s.kind, s.capture) for s in fx_only] == [("blocks.1", "unverified", "fx")]


def test_a_model_no_capture_can_see_is_unverified():
    class ValueBranch(PlainBlock):
        def forward(self, x):
            if x.sum() > 0:  # control flow on values: neither fx nor torch.export
                return self.fc1(x)
            return self.fc2(x)

    with pytest.warns(UserWarning, match="ValueBranch reported as unverified"):
        report = check_plainness(ValueBranch(), X)
    (skip,) = report.skips
    assert (skip.block, skip.kind, skip.capture, report.capture) == (
        "(model)", "unverified", "none", "none")
    assert "torch.fx" in report.note and "torch.export" in report.note
    assert "neither torch.fx nor torch.export" in str(skip)
    with pytest.warns(UserWarning), pytest.raises(NotPlainError, match="1 unverified"):
        assert_plain(ValueBranch(), X)
    with pytest.raises(ValueError, match="capture method"):
        find_skips(PlainBlock(), X, capture="jit")


class TokenModel(nn.Module):
    """Token ids -> embedding -> two pre-norm attention blocks with a mask computed from the
    ids (padding) -> logits: integer tensors carry no residual signal, so the mask is no skip."""

    def __init__(self, vocab=11, d=8):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(Attention(d) for _ in range(2))
        self.head = nn.Linear(d, 3)

    def forward(self, ids):
        h = self.emb(ids)
        mask = (ids == 0)[:, None, :].float() * -1e9
        for layer in self.layers:
            h = layer(h, mask)
        return self.head(h[:, 0])


class Attention(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm, self.q, self.k, self.v, self.o = (nn.LayerNorm(d), nn.Linear(d, d),
                                                     nn.Linear(d, d), nn.Linear(d, d),
                                                     nn.Linear(d, d))

    def forward(self, x, mask):
        h = self.norm(x)
        a = torch.softmax(self.q(h) @ self.k(h).transpose(1, 2) / 8 ** 0.5 + mask, -1)
        return x + self.o(a @ self.v(h))


def test_token_inputs_and_masks_from_them_are_not_skips():
    ids = torch.randint(0, 11, (2, 5))
    for capture in ("fx", "export"):
        skips = find_skips(TokenModel(), ids, capture=capture)
        assert [(s.block, s.kind, s.layers) for s in skips] == [
            ("layers.0", "identity", (0, 2)), ("layers.1", "identity", (0, 2))], capture
        assert skips[0].source == ("emb" if capture == "fx" else "embedding")
        assert find_skips(TokenModel(), {"ids": ids}, capture=capture) == skips  # keywords


@pytest.mark.filterwarnings("ignore:plainness")
@pytest.mark.parametrize("name", ["resnet_mlp", "pnnh_mlp", "plain_cnn1d", "vit_tiny",
                                  "procrustes_resnet_mlp"])
def test_fx_and_torch_export_agree_on_registered_models(name):
    model, x = _small(name)
    by_fx = check_plainness(model, x, capture="fx")
    by_export = check_plainness(model, x, capture="export")
    assert by_export.capture == "export"
    seen = [(s.block, s.kind, s.layers) for s in by_export.skips]
    if by_fx.counts["unverified"]:  # fx could not see in (Procrustes' SVD); export does
        assert by_export.counts["unverified"] == 0 and by_export.counts["residual"] > 0
        assert {(s.block, s.kind, s.layers) for s in by_fx.skips if s.kind != "unverified"} \
            <= set(seen)
    else:
        assert [(s.block, s.kind, s.layers) for s in by_fx.skips] == seen
