"""Export: ``to_plain`` gives an nn.Sequential of plain layers computing the same function
(BatchNorm folded); plain files round-trip; ONNX passes onnx.checker; ``pnnh export`` works."""

from __future__ import annotations

import pytest
import torch
from _helpers import trained_like
from torch import nn

from pnnh import create_model
from pnnh.checkpoint import save_checkpoint
from pnnh.cli import main
from pnnh.errors import PnnhError
from pnnh.export import export_onnx, load_plain, save_plain, to_plain

ALLOWED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.ReLU, nn.Flatten, nn.MaxPool2d,
           nn.AdaptiveAvgPool2d)

CASES = [
    ("pnnh_mlp", (1, 40), {"depth": 8}),
    ("pnnh_mlp", (1, 40), {"depth": 8, "coder_ratio": 0.5, "learner_width": 32}),
    ("pnnh_cnn1d", (1, 40), {"depth": 8, "width": 8}),
    ("pnnh_cnn1d", (1, 40), {"depth": 8, "width": 8, "coder_kernel": 3,
                             "coder_constraint": "penalty"}),
    ("pnnh20", (3, 32, 32), {"width": 4}),
    ("pnnh20", (3, 32, 32), {"width": 4, "coder_ratio": 0.5, "learner_ratio": 0.5}),
    ("pnnh18", (3, 32, 32), {"width": 4}),
    ("pnnh18", (3, 64, 64), {"width": 4}),
    ("pnnh_mlp", (1, 40), {"depth": 8, "coder_constraint": "orthogonal"}),
    ("plain_mlp", (1, 40), {"depth": 8}),
    ("plain20", (3, 32, 32), {"width": 4}),
]


@pytest.mark.parametrize("name,in_shape,kw", CASES)
def test_to_plain_equals_model(name, in_shape, kw):
    torch.manual_seed(0)
    model = trained_like(create_model(name, in_shape=in_shape, **kw))
    plain = to_plain(model)
    assert isinstance(plain, nn.Sequential)
    assert all(isinstance(m, ALLOWED) for m in plain), [type(m).__name__ for m in plain]
    x = torch.randn(3, *in_shape)
    with torch.no_grad():
        y, yp = model(x), plain(x)
    assert y.abs().max() > 0.1  # a non-trivial function
    # the same function with every BatchNorm folded, re-associated in float32: ~u per operation
    # through ~20 layers, relative to the output's scale (randomised statistics give logits ~60)
    tol = 1e-5 * max(1.0, float(y.abs().max()))
    assert torch.allclose(yp, y, atol=tol, rtol=0), float((yp - y).abs().max())
    # weights are materialized copies: changing the model does not change the export
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
        assert torch.equal(plain(x), yp)


def test_pnnh_plain_form_has_coder_rows_and_no_batchnorm():
    model = trained_like(create_model("pnnh20", width=4, learner_ratio=0.5))
    plain = to_plain(model, lean=False)  # the full [A; -A; E] form (lean drops -A: A = I)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in plain)
    block = model.blocks[0]
    l1 = plain[2]  # stem conv (BatchNorm folded), ReLU, then the block's first layer
    m = block.coder.width
    a = block.coder.kernel()[:, :, 0, 0]
    assert l1.out_channels == 2 * m + block.learner_width
    assert torch.allclose(l1.weight[:m, :, 1, 1], a) and torch.allclose(l1.weight[m:2 * m, :, 1, 1], -a)
    assert torch.count_nonzero(l1.bias[:2 * m]) == 0


def test_resnet_is_not_plain():
    with pytest.raises(PnnhError, match="resnet_to_plain"):
        to_plain(create_model("resnet_mlp", depth=8))
    with pytest.raises(PnnhError, match="resnet_to_plain"):
        to_plain(create_model("resnet20", width=4))


def test_plain_file_round_trip(tmp_path):
    model = trained_like(create_model("pnnh18", in_shape=(3, 64, 64), width=4))
    plain = to_plain(model)
    path = save_plain(plain, tmp_path / "p.pt")
    again = load_plain(path)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(again(x), plain(x))
    (tmp_path / "bad.pt").write_bytes(b"not a model")
    with pytest.raises(PnnhError):
        load_plain(tmp_path / "bad.pt")


def test_plain_file_is_checksummed_like_a_checkpoint(tmp_path):
    plain = to_plain(trained_like(create_model("pnnh_mlp", depth=4, width=8)))
    path = save_plain(plain, tmp_path / "p.pt")
    payload = torch.load(path, weights_only=True)
    assert len(payload["sha256"]) == 64
    key = next(k for k in payload["state_dict"] if k.endswith("weight"))
    payload["state_dict"][key][0, 0] += 1.0  # one weight changed, the digest kept
    torch.save(payload, tmp_path / "tampered.pt")
    with pytest.raises(PnnhError, match="corrupted.*sha256"):
        load_plain(tmp_path / "tampered.pt")
    del payload["sha256"]
    torch.save(payload, tmp_path / "old.pt")
    with pytest.raises(PnnhError, match="no checksum"):
        load_plain(tmp_path / "old.pt")


@pytest.mark.parametrize("name,in_shape,kw", [
    ("pnnh20", (3, 32, 32), {"width": 4}),
    ("pnnh_cnn1d", (1, 40), {"depth": 8, "width": 8}),
])
def test_onnx_export_passes_checker(tmp_path, name, in_shape, kw):
    onnx = pytest.importorskip("onnx")
    model = trained_like(create_model(name, in_shape=in_shape, **kw))
    path = export_onnx(model, tmp_path / "m.onnx", torch.randn(2, *in_shape))
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    ops = {n.op_type for n in proto.graph.node}
    # one straight chain of layers: no Add/Concat anywhere (no skip connections)
    assert ops <= {"Gemm", "Conv", "Relu", "Flatten", "GlobalAveragePool", "MaxPool"}, ops


def _checkpoint(tmp_path, name, kwargs):
    model = trained_like(create_model(name, **kwargs))
    path = tmp_path / "ckpt.pt"
    kw = {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}
    save_checkpoint(path, {"model_name": name, "model_kwargs": kw, "model": model.state_dict(),
                           "epoch": 1})
    return model, path


def test_cli_export_plain_and_onnx(tmp_path, capsys):
    model, ckpt = _checkpoint(tmp_path, "pnnh_mlp", {"in_shape": (1, 40), "depth": 8,
                                                     "width": 16})
    out = tmp_path / "plain.pt"
    assert main(["export", "--checkpoint", str(ckpt), "--format", "plain", "--out", str(out)]) == 0
    x = torch.randn(5, 1, 40)
    with torch.no_grad():
        assert torch.allclose(load_plain(out)(x), model(x), atol=1e-5)
    pytest.importorskip("onnx")
    out = tmp_path / "m.onnx"
    assert main(["export", "--checkpoint", str(ckpt), "--format", "onnx", "--out", str(out)]) == 0
    import onnx

    onnx.checker.check_model(onnx.load(str(out)))


def test_cli_export_errors(tmp_path, capsys):
    assert main(["export", "--checkpoint", str(tmp_path / "missing.pt"), "--out",
                 str(tmp_path / "x.pt")]) == 2
    assert "missing.pt" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(tmp_path / "missing.pt"), "--input-shape",
                 "1,40", "--out", str(tmp_path / "x.pt")]) == 2
    assert "--input-shape: only with --model-file" in capsys.readouterr().err


def test_cli_exports_a_resnet_checkpoint_through_its_plain_form(tmp_path):
    """A ResNet has no plain form block by block: export converts it (resnet_to_plain)."""
    model, ckpt = _checkpoint(tmp_path, "resnet_mlp", {"in_shape": (1, 40), "depth": 8,
                                                       "width": 8})
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "x.pt")]) == 0
    x = torch.randn(4, 1, 40)
    with torch.no_grad():
        assert torch.allclose(load_plain(tmp_path / "x.pt")(x), model(x), atol=1e-5)


def test_to_plain_dispatches_vits_and_export_checkpoint_names_the_format(tmp_path):
    """PNNH-ViT exports through pnnh.to_plain; its attention layers need ONNX, not the plain file."""
    import pnnh
    from pnnh.checkpoint import export_checkpoint
    from pnnh.errors import PnnhError

    model = pnnh.create_model("pnnh_vit_tiny", depth=2, width=16, heads=2).eval()
    x = torch.randn(4, 1, 40)
    assert torch.allclose(pnnh.to_plain(model)(x), model(x), atol=1e-5)
    with pytest.raises(PnnhError, match="ViTBlock"):
        pnnh.to_plain(pnnh.create_model("vit_tiny", depth=2, width=16, heads=2).eval())
    pnnh.train({"model": "pnnh_vit_tiny", "depth": 2, "width": 16, "model_args": {"heads": 2},
                "epochs": 1, "num_samples": 200, "max_steps_per_epoch": 1, "progress": False,
                "out": str(tmp_path / "run")})
    ckpt = tmp_path / "run" / "checkpoints" / "last.pt"
    with pytest.raises(PnnhError, match="use --format onnx"):
        export_checkpoint(ckpt, "plain", tmp_path / "vit.pt")
    assert not (tmp_path / "vit.pt").exists()
    pytest.importorskip("onnx")
    import onnx

    path = export_checkpoint(ckpt, "onnx", tmp_path / "vit.onnx")
    onnx.checker.check_model(onnx.load(str(path)))
