"""find_skips on the models people use: real torchvision, timm and Hugging Face models at random
init (small configs, nothing downloaded). Exact counts of residual connections (additive skips)
and gates (squeeze-excitation products), and which capture saw the model: torch.fx for the
vision models, torch.export for Hugging Face ones (fx cannot trace them). Runs in the ecosystem
environment (`make test-ecosystem`); skips elsewhere."""

from __future__ import annotations

import warnings

import pytest
import torch

from pnnh.plainness import NotPlainError, assert_plain, check_plainness

pytestmark = pytest.mark.ecosystem

IMAGE = (2, 3, 64, 64)


def _check(model, x, capture="auto"):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # an unverified part would warn
        return check_plainness(model, x, capture=capture)


@pytest.mark.parametrize("name, residual, gates", [
    ("resnet18", 8, 0), ("resnet50", 16, 0),
    ("mobilenet_v3_small", 6, 9),   # 6 inverted residuals add; 9 SE blocks gate
    ("efficientnet_b0", 9, 16),     # 16 MBConv blocks, each with SE; 9 keep their shape
])
def test_torchvision(name, residual, gates):
    tvm = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    model = getattr(tvm, name)(num_classes=10)
    report = _check(model, torch.randn(IMAGE))
    assert report.capture == "fx"
    assert report.counts == {"residual": residual, "gate": gates, "unverified": 0}
    assert all(s.layers[0] == 0 for s in report.skips if s.kind == "gate")  # x * s(x)
    # torch.export sees the same connections, in the same blocks, with the same counts
    by_export = _check(model, torch.randn(IMAGE), capture="export")
    assert [(s.block, s.kind, s.layers) for s in by_export.skips] == [
        (s.block, s.kind, s.layers) for s in report.skips]


@pytest.mark.parametrize("name, kw, shape, residual", [
    ("resnet18", {}, IMAGE, 8),
    ("convnext_atto", {}, IMAGE, 12),                               # depths 2, 2, 6, 2
    ("vit_tiny_patch16_224", {"img_size": 32}, (2, 3, 32, 32), 24),  # 12 blocks x 2
])
def test_timm(name, kw, shape, residual):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, **kw)
    report = _check(model, torch.randn(shape))
    assert report.counts == {"residual": residual, "gate": 0, "unverified": 0}
    assert report.capture == "fx"


def _hf(name: str, attn: str):
    tr = pytest.importorskip("transformers")
    torch.manual_seed(0)
    small = {"vocab_size": 100, "attn_implementation": attn}
    if name == "bert":
        return tr.BertForSequenceClassification(tr.BertConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            num_labels=3, **small)), "bert.encoder.layer"
    if name == "gpt2":
        return tr.GPT2ForSequenceClassification(tr.GPT2Config(
            n_embd=32, n_layer=2, n_head=2, n_positions=64, num_labels=3, pad_token_id=0,
            **small)), "transformer.h"
    if name == "gpt2_lm":
        return tr.GPT2LMHeadModel(tr.GPT2Config(
            n_embd=32, n_layer=2, n_head=2, n_positions=64, **small)), "transformer.h"
    return tr.LlamaForCausalLM(tr.LlamaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=64, max_position_embeddings=64, **small)), "model.layers"


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("name", ["bert", "gpt2", "gpt2_lm", "llama"])
def test_hugging_face_two_skips_per_layer(name, attn):
    """Attention (q kᵀ, softmax v), the rotary embedding (x cos + rotate_half(x) sin), RMSNorm
    (x rsqrt(mean x²)), the gated MLP (silu(W₁x) W₃x) and the attention mask are not skips:
    exactly the attention and MLP additions of each of the 2 layers are, each identity."""
    model, stack = _hf(name, attn)
    ids = torch.randint(1, 100, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[0, 12:] = 0
    for x in (ids, {"input_ids": ids, "attention_mask": mask}):
        report = _check(model, x)
        assert report.capture == "export" and report.note.startswith("torch.fx")
        assert [(s.block, s.kind, s.layers) for s in report.skips] == [
            (f"{stack}.{i}", "identity", (0, 2)) for i in (0, 0, 1, 1)]
    with pytest.raises(NotPlainError, match=r"4 residual connection\(s\) \[torch.export\]"):
        assert_plain(model, ids)
