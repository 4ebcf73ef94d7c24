"""ViT, plain ViT and PNNH-ViT: shapes, the PNNH-ViT at initialisation, plainness, export."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pnnh
from pnnh.errors import ConfigError
from pnnh.models.vit import (
    CoderAttention,
    CoderMlp,
    PNNHViTBlock,
    ViTBlock,
    vit_to_plain,
)
from pnnh.plainness import find_skips

SHAPES = [(1, 40), (3, 32, 32)]
NAMES = ["vit_tiny", "plain_vit_tiny", "pnnh_vit_tiny"]


def _small(name, shape, **kw):
    kw = {"depth": 2, "width": 16, "heads": 2, **kw}
    return pnnh.create_model(name, in_shape=shape, num_classes=7, **kw)


def _randomize(model: nn.Module) -> nn.Module:
    """Move every weight away from its init (non-orthogonal coders, non-zero decoders,
    non-trivial LayerNorms) so that equalities below are not the init's special case."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", NAMES)
def test_shapes_on_images_and_sequences(name, shape):
    model = _small(name, shape, patch_size=4)
    x = torch.randn(3, *shape)
    assert model(x).shape == (3, 7)
    tokens = model.stem(x)
    n = 10 if len(shape) == 2 else 64
    assert tokens.shape == (3, n, 16) and model.stem.num_tokens == n
    assert len(model.blocks) == 2
    assert model.blocks(tokens).shape == tokens.shape


def test_patch_size_depth_and_bad_arguments():
    model = _small("pnnh_vit_tiny", (1, 40), patch_size=8, depth=5)
    assert model.stem.num_tokens == 5 and len(model.blocks) == 5
    with pytest.raises(ConfigError, match="patch_size"):
        _small("vit_tiny", (1, 40), patch_size=3)
    with pytest.raises(ConfigError, match="heads"):
        _small("pnnh_vit_tiny", (1, 40), heads=3)
    with pytest.raises(ConfigError, match="in_shape"):
        _small("vit_tiny", (40,))


def test_pnnh_vit_parameters_the_vits_at_defaults_two_coders_more_when_trained():
    vit, pv = _small("vit_tiny", (1, 40)), _small("pnnh_vit_tiny", (1, 40))
    assert pnnh.count_parameters(pv) == pnnh.count_parameters(vit)  # A = I is a buffer
    trained = _small("pnnh_vit_tiny", (1, 40), coder_constraint="newton_schulz")
    # two A (16 x 16) per block; everything else is shaped as in the ViT
    assert pnnh.count_parameters(trained) - pnnh.count_parameters(vit) == 2 * 2 * 16 * 16
    half = _small("pnnh_vit_tiny", (1, 40), coder_ratio=0.5, coder_constraint="newton_schulz")
    assert pnnh.count_parameters(trained) - pnnh.count_parameters(half) == 2 * 2 * 8 * 16


@pytest.mark.parametrize("fused", [True, False])
def test_default_pnnh_vit_computes_the_pre_norm_vit_with_the_same_weights(fused):
    """At its defaults (r = 1, fixed A = I) the PNNH-ViT is the pre-norm ViT as a plain chain:
    copy the ViT's weights in and the outputs agree, in the fused form (which adds the token
    itself) and in the [A; -A] form (which carries it through GELU(z) - GELU(-z))."""
    vit = _randomize(_small("vit_tiny", (1, 40)))
    pv = _small("pnnh_vit_tiny", (1, 40), fused=fused)
    names = {"ln1": "attn.norm", "ln2": "mlp.norm"}
    state = {}
    for key, value in vit.state_dict().items():
        if key.startswith("blocks."):
            _, i, rest = key.split(".", 2)
            head, _, tail = rest.partition(".")
            rest = f"{names[head]}.{tail}" if head in names else rest
            key = f"blocks.{i}.{rest}"
        state[key] = value
    missing, unexpected = pv.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("coder.weight") for k in missing), missing
    x = torch.randn(5, 1, 40)
    with torch.no_grad():
        assert torch.allclose(pv.eval()(x), vit.eval()(x), atol=1e-5)
        plain = vit_to_plain(pv)
        assert torch.allclose(plain(x), vit(x), atol=1e-5)
    assert find_skips(plain, x) == []


# ----------------------------------------------------------------- the PNNH-ViT at init


def test_pnnh_vit_block_at_init_is_the_identity_when_the_coder_reads_the_raw_token():
    """r = 1, A orthogonal (AᵀA = I), W_o = D = 0, zero biases: the attention sublayer is
    AᵀA x = x and so is the MLP sublayer, whatever the heads and the learner compute."""
    torch.manual_seed(0)
    model = pnnh.create_model("pnnh_vit_tiny", depth=12, width=32, coder_norm=False,
                              zero_init_decoder=True)
    e = 3 * torch.randn(4, 10, 32) + 1
    torch.testing.assert_close(model.blocks[0](e), e, atol=1e-5, rtol=0)
    torch.testing.assert_close(model.blocks(e), e, atol=1e-4, rtol=0)


def test_pnnh_vit_block_at_init_renormalizes_when_the_coder_reads_the_normalized_token():
    """Same init, coder_norm=True: the block is LN2(LN1(x)); so the 12-block trunk maps the
    token embedding e to LN(e) (LN is idempotent up to its eps): the input never dissipates."""
    torch.manual_seed(0)
    model = pnnh.create_model("pnnh_vit_tiny", depth=12, width=32, coder_norm=True,
                              zero_init_decoder=True)
    e = 3 * torch.randn(4, 10, 32) + 1
    ln = lambda t: F.layer_norm(t, (32,))  # noqa: E731
    torch.testing.assert_close(model.blocks[0](e), ln(ln(e)), atol=1e-5, rtol=0)
    torch.testing.assert_close(model.blocks(e), ln(e), atol=1e-4, rtol=0)
    # the plain ViT (no coder) does not preserve its input at init
    plain = pnnh.create_model("plain_vit_tiny", depth=12, width=32)
    assert (plain.blocks(e) - ln(e)).abs().max() > 0.5


@pytest.mark.parametrize("act", ["gelu", "relu"])
def test_fused_coder_equals_the_two_signed_halves(act):
    """φ(z) - φ(-z) = z for ReLU and for GELU (z Φ(z) + z Φ(-z) = z): the fused AᵀA form and
    the [A; -A] / [Aᵀ, -Aᵀ] form give the same outputs and gradients."""
    torch.manual_seed(0)
    fused = _randomize(CoderMlp(16, 32, act, coder_norm=True, zero_init_decoder=False))
    split = CoderMlp(16, 32, act, coder_norm=True, zero_init_decoder=False, fused=False)
    split.load_state_dict(fused.state_dict())
    x = torch.randn(5, 3, 16)
    y1, y2 = fused(x), split(x)
    torch.testing.assert_close(y1, y2, atol=1e-5, rtol=1e-5)
    y1.square().sum().backward()
    y2.square().sum().backward()
    torch.testing.assert_close(fused.coder.weight.grad, split.coder.weight.grad, atol=1e-4,
                               rtol=1e-4)


def test_gradcheck_attention_coder_shared_weight():
    """The shared A gets the sum of its encoder and decoder gradients (checked numerically)."""
    torch.manual_seed(0)
    att = _randomize(CoderAttention(4, 2, zero_init_proj=False)).double()
    x = torch.randn(2, 3, 4, dtype=torch.double, requires_grad=True)
    a = att.coder.weight

    def f(x, a_):
        with torch.no_grad():
            a.copy_(a_)
        return torch.func.functional_call(att, {"coder.weight": a_}, (x,))

    assert torch.autograd.gradcheck(f, (x, a.detach().clone().requires_grad_()))


def test_coder_constraint_projects_both_coders_of_every_block():
    model = _small("pnnh_vit_tiny", (1, 40), procrustes=True)
    coders = [m.coder for b in model.blocks for m in (b.attn, b.mlp)]
    assert len(model.coder_constraint._coders) == len(coders) == 4
    with torch.no_grad():
        for c in coders:
            c.weight.add_(0.1 * torch.randn_like(c.weight))
    model.coder_constraint.after_optimizer_step()
    eye = torch.eye(16)
    for c in coders:
        torch.testing.assert_close(c.weight.t() @ c.weight, eye, atol=1e-5, rtol=0)


# ----------------------------------------------------------------- plainness and export


@pytest.mark.parametrize("shape", SHAPES)
def test_plainness(shape):
    x = torch.randn(2, *shape)
    for cn in (True, False):
        assert find_skips(_small("pnnh_vit_tiny", shape, coder_norm=cn, fused=False), x) == []
        trained = _small("pnnh_vit_tiny", shape, coder_norm=cn, coder_constraint="newton_schulz")
        assert find_skips(trained, x) == []  # A on the path: A^T(A c), no addition of c
        # the default training form with A = I adds c itself: an exact reparametrization of
        # the plain form above, which the checker rightly calls a skip (one per sublayer)
        fused = find_skips(_small("pnnh_vit_tiny", shape, coder_norm=cn), x)
        assert len(fused) == 4 and all(s.kind == "identity" for s in fused)
    assert find_skips(_small("plain_vit_tiny", shape), x) == []
    skips = find_skips(_small("vit_tiny", shape, depth=3), x)
    # two residual connections per block: around attention and around the MLP
    assert [s.block for s in skips] == ["blocks.0", "blocks.0", "blocks.1", "blocks.1",
                                        "blocks.2", "blocks.2"]
    assert all(s.kind == "identity" and s.sink.startswith("add") for s in skips)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("coder_norm", [True, False])
@pytest.mark.parametrize("act", ["gelu", "relu"])
def test_export_to_plain_sequential_is_equal(shape, coder_norm, act):
    # a trainable, unconstrained coder, so that _randomize moves A off the orthogonal
    model = _randomize(_small("pnnh_vit_tiny", shape, coder_norm=coder_norm, act=act,
                              coder_ratio=0.75, coder_constraint="none")).eval()
    plain = vit_to_plain(model)
    assert isinstance(plain, nn.Sequential)
    x = torch.randn(4, *shape)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), model(x), atol=1e-5, rtol=1e-5)
    assert find_skips(plain, x) == []
    # nothing shared: per block, A (m x 16) becomes A and Aᵀ in attention, [A; -A] and
    # [Aᵀ, -Aᵀ] in the MLP (6 copies instead of 2), plus the MLP coder units' zero biases
    m = 12  # 0.75 * 16
    extra = 2 * (4 * m * 16 + (2 * m if coder_norm else 0))
    assert pnnh.count_parameters(plain) == pnnh.count_parameters(model) + extra
    assert not any(isinstance(b, PNNHViTBlock) for b in plain)


def test_export_plain_vit_and_refuse_residual_vit():
    model = _randomize(_small("plain_vit_tiny", (3, 32, 32))).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(vit_to_plain(model)(x), model(x), atol=1e-5, rtol=1e-5)
    vit = _small("vit_tiny", (1, 40))
    assert isinstance(vit.blocks[0], ViTBlock)
    with pytest.raises(ValueError, match="block 0"):
        vit_to_plain(vit)


def test_exported_pnnh_vit_is_valid_onnx():
    onnx = pytest.importorskip("onnx")
    model = _randomize(_small("pnnh_vit_tiny", (1, 40))).eval()
    buf = io.BytesIO()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(vit_to_plain(model), (torch.randn(2, 1, 40),), buf, dynamo=False,
                          input_names=["input"], output_names=["logits"])
    onnx.checker.check_model(onnx.load_from_string(buf.getvalue()))


def test_every_parameter_learns_after_the_first_step():
    """W_o = D = 0 at init stops the gradient to qkv / the learner's E at step 0 only."""
    torch.manual_seed(0)
    model = _small("pnnh_vit_tiny", (1, 40), zero_init_decoder=True)
    x, y = torch.randn(8, 1, 40), torch.randint(0, 7, (8,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    silent = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert silent == []
