"""Models we did not write (tests/user_models.py: VGG with BatchNorm, a torchvision-layout
ResNet, an nn.TransformerEncoder classifier, a Hugging Face-style encoder.layer stack) through
every probe, the plainness checker, resnet_to_plain and the CLI with --model-file."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import user_models as um
from _helpers import trained_like
from torch import nn

import pnnh
from pnnh.cli import main
from pnnh.errors import PnnhError
from pnnh.plainness import assert_plain, find_skips
from pnnh.probes.common import find_blocks
from pnnh.probes.dissipation import dissipation
from pnnh.probes.hessian import HessianOperator
from pnnh.probes.jacobian import jacobian_singular_values
from pnnh.probes.norms import norms

MODELS = list(um.INPUT_SHAPES)
FILE = str(Path(um.__file__))


def _batch(name: str, n: int = 16):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, *um.INPUT_SHAPES[name], generator=g)
    return x, torch.randint(0, 10, (n,), generator=g)


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return trained_like(getattr(um, name)())


# --------------------------------------------------------------------------- discovery + skips
BLOCKS = {
    "vgg": [f"features.{i}" for i in range(14)],
    "tv_resnet": [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)],
    "transformer": [f"encoder.layers.{i}" for i in range(3)],
    "hf_stack": [f"encoder.layer.{i}" for i in range(4)],
}


@pytest.mark.parametrize("name", MODELS)
def test_blocks_are_found_in_each_layout(name):
    assert [n for n, _ in find_blocks(_model(name))] == BLOCKS[name]


def test_no_blocks_is_one_line_naming_candidates():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.trunk = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
            self.out = nn.Linear(4, 2)

        def forward(self, x):
            return self.out(self.trunk(x))

    with pytest.raises(PnnhError) as e:
        find_blocks(Odd())
    assert "\n" not in str(e.value) and "trunk" in str(e.value)


def test_every_residual_connection_is_listed_by_block_source_and_sink():
    x, _ = _batch("tv_resnet", 2)
    skips = find_skips(_model("tv_resnet"), x)
    assert [s.block for s in skips] == BLOCKS["tv_resnet"]  # 8 blocks, 8 connections
    kinds = {s.block: s.kind for s in skips}
    assert [b for b, k in kinds.items() if k == "projection"] == ["layer2.0", "layer3.0", "layer4.0"]
    assert len({(s.source, s.sink) for s in skips}) == 8
    x, _ = _batch("hf_stack", 2)
    skips = find_skips(_model("hf_stack"), x)
    assert len(skips) == 8 and {s.kind for s in skips} == {"identity"}
    assert [s.block for s in skips] == [b for b in BLOCKS["hf_stack"] for _ in range(2)]


def test_transformer_encoder_is_seen_into_not_passed_as_plain():
    x, _ = _batch("transformer", 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left opaque
        skips = find_skips(_model("transformer"), x)
    assert len(skips) == 6 and all(s.kind == "identity" for s in skips)


def test_plain_vgg_is_plain():
    x, _ = _batch("vgg", 2)
    assert_plain(_model("vgg"), x)


# --------------------------------------------------------------------------- probes
@pytest.mark.parametrize("name", MODELS)
def test_norms_dissipation_jacobian_run_on_each(name):
    model, (x, y) = _model(name), _batch(name)
    recs = norms(model, (x, y))
    assert [r["block"] for r in recs] == BLOCKS[name]
    assert all(r["ratio"] > 0 for r in recs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        recs = dissipation(model, x)
    assert [r["layer"] for r in recs] == BLOCKS[name]
    assert all(0 <= r["surviving_fraction"] <= 1 for r in recs)
    sv = jacobian_singular_values(model, x[:3])
    assert sv.shape == (3, 10) and bool((sv >= 0).all())


@pytest.mark.parametrize("name", ["vgg", "tv_resnet", "hf_stack", "transformer"])
def test_hessian_extremes_on_each(name):
    """The Transformer needs the double-backward fallback (no forward AD of CPU attention)."""
    model, batch = _model(name), _batch(name, 8)
    ext = HessianOperator(model, batch).extreme_eigenvalues(max_iter=4)
    assert ext["lambda_max"] >= ext["lambda_min"]


@pytest.mark.parametrize("block", ["BasicBlock", "Bottleneck", "PreActBlock", "SEBlock"])
def test_batchnorm_folding_in_torchvision_layouts(block):
    """Every conv→BN pair folds (torchvision's in-place ReLU after the BN included); a
    pre-activation BN, which reads the block input (also the identity path), does not; and
    the Hessian is the same (float64 HVPs)."""
    torch.manual_seed(0)
    model = trained_like(um.ResNet(block=getattr(um, block), layers=(1, 1, 1, 1))).double()
    x, y = _batch("tv_resnet", 4)
    x = x.double()
    op = HessianOperator(model, (x, y), fold_batchnorm="all")
    ref = HessianOperator(model, (x, y), fold_batchnorm=False)
    bns = {n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    pre = {n for n in bns if block == "PreActBlock" and n.endswith(".bn1")}
    assert {b for _, b in op.folded} == bns - pre and len(pre) == (4 if pre else 0)
    v = torch.randn(op.dim, dtype=torch.float64)
    assert torch.allclose(op.hvp(v), ref.hvp(v), rtol=1e-9, atol=1e-12)


def test_a_module_called_twice_is_probed_per_call():
    """torchvision's one `self.relu` runs twice per block: two records, not a hard stop."""
    model, (x, _) = _model("tv_resnet"), _batch("tv_resnet")
    recs = dissipation(model, x, ["layer1.0.relu", "layer1.0.conv2"])
    assert [r["layer"] for r in recs] == ["layer1.0.relu", "layer1.0.conv2", "layer1.0.relu@1"]
    assert recs[0]["depth"] < recs[1]["depth"] <= recs[2]["depth"]
    recs = norms(model, _batch("tv_resnet"), blocks=["layer1.0.relu"])
    assert [r["block"] for r in recs] == ["layer1.0.relu", "layer1.0.relu@1"]
    assert all(r["ratio"] > 0 for r in recs)


def test_default_layers_that_never_run_are_skipped_with_a_note_named_ones_are_errors():
    layer = _model("transformer").encoder.layers[0]  # no blocks: activation/Linear leaves
    x = torch.randn(8, 6, 32)
    with pytest.warns(UserWarning, match="self_attn.out_proj never ran"):
        recs = dissipation(layer, x)
    assert "self_attn.out_proj" not in [r["layer"] for r in recs] and recs
    with pytest.raises(PnnhError, match="never ran"):
        dissipation(layer, x, ["self_attn.out_proj"])


# --------------------------------------------------------------------------- conversion
def _tv(block, layers=(1, 1, 1, 1)) -> nn.Module:
    torch.manual_seed(0)
    return trained_like(um.ResNet(block, layers))


def test_torchvision_resnet_converts_exactly():
    model, (x, _) = _model("tv_resnet"), _batch("tv_resnet")
    plain = pnnh.convert.resnet_to_plain(model)  # reachable after `import pnnh`
    with torch.no_grad():
        torch.testing.assert_close(plain(x), model(x), atol=1e-5, rtol=0)
    assert_plain(plain, x[:2])


@pytest.mark.parametrize("block", [um.Bottleneck, um.PreActBlock])
def test_bottleneck_and_pre_activation_blocks_convert_exactly(block):
    model, x = _tv(block), torch.randn(2, 3, 32, 32)
    plain = pnnh.convert.resnet_to_plain(model)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), model(x), atol=1e-5, rtol=1e-5)
    assert_plain(plain, x)


def test_blocks_that_do_not_convert_are_named():
    with pytest.raises(PnnhError, match=r"layer1\.0 \(SEBlock\).*squeeze-excitation"):
        pnnh.convert.resnet_to_plain(_tv(um.SEBlock))


def test_a_block_with_an_unexpected_forward_is_caught_by_the_check():
    class Doubled(um.BasicBlock):  # known sub-modules, different function
        def forward(self, x):
            return super().forward(x) * 2

    with pytest.raises(PnnhError, match=r"layer1\.0 \(Doubled\).*its forward is not"):
        pnnh.convert.resnet_to_plain(_tv(Doubled))


# --------------------------------------------------------------------------- command line
def _shape(name: str) -> str:
    return ",".join(str(d) for d in um.INPUT_SHAPES[name])


@pytest.mark.parametrize("name", MODELS)
def test_cli_probes_a_model_file(name, tmp_path, capsys):
    common = ["--model-file", f"{FILE}:{name}", "--input-shape", _shape(name),
              "--num-samples", "16"]
    for probe, extra in (("norms", []), ("dissipation", []), ("jacobian", [])):
        out = tmp_path / probe
        assert main(["probe", probe, *common, *extra, "--out", str(out)]) == 0, probe
        records = json.loads((out / f"{probe}.json").read_text())
        assert records
    assert f"user_models:{name}" in capsys.readouterr().out


@pytest.mark.parametrize("name", [
    "vgg", "transformer"])
def test_cli_hessian_of_a_model_file(name, tmp_path):
    out = tmp_path / "h"
    rc = main(["probe", "hessian", "--model-file", f"{FILE}:{name}", "--input-shape",
               _shape(name), "--num-samples", "16", "--dense", "never", "--max-iter", "6",
               "--hutchinson-samples", "4", "--slq-runs", "1", "--slq-steps", "4",
               "--out", str(out)])
    assert rc == 0
    (rec,) = json.loads((out / "hessian.json").read_text())
    assert rec["model"] == f"user_models:{name}"


def test_cli_registry_model_gets_a_batch_of_its_own_shape(tmp_path, capsys):
    rc = main(["probe", "norms", "--model", "resnet20", "--width", "4", "--num-samples", "8",
               "--out", str(tmp_path / "n")])
    assert rc == 0
    assert "synthetic batch of shape (3, 32, 32)" in capsys.readouterr().out


@pytest.mark.parametrize("argv,field", [
    (["--model-file", "missing.py:f"], "missing.py does not exist"),
    (["--model-file", "nofactory"], "expected FILE.py:FACTORY"),
    (["--model-file", f"{FILE}:INPUT_SHAPES"], "has no callable"),
    (["--model-file", f"{FILE}:vgg", "--input-shape", "3,x"], "--input-shape"),
    (["--model-file", f"{FILE}:vgg", "--input-shape", "5,16,16"], "forward on a batch of shape"),
    (["--model-file", f"{FILE}:vgg", "--model", "plain_mlp"], "exactly one of"),
    (["--model", "plain_mlp", "--input-shape", "1,40", "--dataset", "digits"], "exclude"),
])
def test_cli_mistakes_are_one_line_exit_2(argv, field, tmp_path, capsys):
    rc = main(["probe", "norms", *argv, "--num-samples", "8", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and field in err and "\n" not in err and "Traceback" not in err


def test_cli_dataset_arg_reaches_the_probe_batch(tmp_path, capsys):
    argv = ["probe", "jacobian", "--model", "plain_cnn1d", "--depth", "4", "--width", "4",
            "--dataset", "synthetic", "--num-samples", "4", "--out", str(tmp_path / "j")]
    assert main([*argv, "--dataset-arg", "input_shape=[2,24]"]) == 0
    assert main([*argv, "--dataset-arg", "colour=red"]) == 2
    assert "--dataset-arg" in capsys.readouterr().err
