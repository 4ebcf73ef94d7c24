"""Real torchvision, timm and Hugging Face models (tests/ecosystem_models.py, random init,
nothing downloaded) through every probe and ``--model-file``, as a user would bring them.

Run by ``make test-ecosystem`` (its own environment: torch 2.14.1 + torchvision, timm,
transformers); in ``make test`` these tests skip with that reason."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.ecosystem

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import ecosystem_models as em  # noqa: E402

from pnnh.cli import main  # noqa: E402

FILE = str(HERE / "ecosystem_models.py")
BLOCKS = {  # the layer stack each model's probes find
    "tv_resnet18": [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)],
    "tv_resnet50": [f"layer{i}.{j}" for i, n in zip(range(1, 5), (3, 4, 6, 3)) for j in range(n)],
    "tv_vit": ["encoder.layers.encoder_layer_0", "encoder.layers.encoder_layer_1"],
    "timm_resnet18": [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)],
    "timm_convnext": [f"stages.{i}.blocks.{j}" for i, n in enumerate((2, 2, 6, 2))
                      for j in range(n)],
    "timm_vit": ["blocks.0", "blocks.1"],
    "hf_bert": ["bert.encoder.layer.0", "bert.encoder.layer.1"],
    "hf_gpt2": ["transformer.h.0", "transformer.h.1"],
    "hf_llama": ["model.layers.0", "model.layers.1"],
}
HAS_BN = {"tv_resnet18", "tv_resnet50", "tv_mobilenet_v3_small", "timm_resnet18"}


@pytest.fixture(autouse=True)
def _quick(monkeypatch):
    monkeypatch.setenv("PNNH_QUICK", "1")  # the probes' iteration caps of the docs' tests


def _probe(probe: str, model: str, out: Path, *extra: str) -> list[dict]:
    argv = ["probe", probe, "--model-file", f"{FILE}:{model}", "--input-shape",
            em.INPUTS[model], "--num-samples", "8", "--out", str(out), *extra]
    assert main(argv) == 0
    return json.loads((out / f"{probe}.json").read_text())


@pytest.mark.parametrize("model", sorted(em.INPUTS))
def test_every_probe_runs_on_the_real_model(model, tmp_path, capsys):
    norms = _probe("norms", model, tmp_path / "n")
    if model in BLOCKS:
        assert [r["block"] for r in norms] == BLOCKS[model]
    if model == "tv_vit":  # torchvision zero-initialises the ViT's head: no gradient at init
        assert all(r["grad_out_norm"] == 0 and r["ratio"] is None for r in norms)
        assert "every block's output gradient is 0" in capsys.readouterr().out
    else:
        assert all(math.isfinite(r["ratio"]) and r["ratio"] > 0 for r in norms)
    (hess,) = _probe("hessian", model, tmp_path / "h")
    assert math.isfinite(hess["lambda_max"]) and hess["lambda_max"] > 0
    assert hess["num_params"] == sum(p.numel() for p in getattr(em, model)().parameters())
    diss = _probe("dissipation", model, tmp_path / "d")
    assert diss and all(0 <= r["surviving_fraction"] <= 1 for r in diss)
    (jac,) = _probe("jacobian", model, tmp_path / "j")
    assert math.isfinite(jac["sv_max"]) and (jac["sv_max"] > 0) == (model != "tv_vit")
    bn = {norms[0]["bn"], hess["bn"], diss[0]["bn"], jac["bn"]}
    assert bn == ({"batch", "batch, held fixed"} if model in HAS_BN else {"none"})


def test_mobilenet_v3_hessian_goes_through_hardsigmoid_exactly():
    """torchvision's squeeze-excitation gate is a Hardsigmoid, which PyTorch cannot
    differentiate twice; the HVP through its substitute equals, in float64, the HVP of the same
    network with every Hardsigmoid written as ``relu6(x + 3) / 6`` (which PyTorch does
    differentiate twice, with the same derivative convention at the kinks)."""
    from torch import nn

    from pnnh.probes.hessian import HessianOperator

    class Relu6Sigmoid(nn.Module):
        def forward(self, x):
            return nn.functional.relu6(x + 3) / 6

    model = em.tv_mobilenet_v3_small().double().eval()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 3, 32, 32, generator=g, dtype=torch.float64), torch.tensor([0, 1, 2, 3])
    op = HessianOperator(model, (x, y), fold_batchnorm=False)
    v = torch.randn(op.dim, generator=g, dtype=torch.float64)
    hv = op.hvp(v)
    assert "hardsigmoid computed by an exact substitute" in op.hvp_method
    gates = [n for n, m in model.named_modules() if isinstance(m, nn.Hardsigmoid)]
    assert len(gates) == 9
    for name in gates:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, Relu6Sigmoid())
    ref_op = HessianOperator(model, (x, y), fold_batchnorm=False)
    ref = ref_op.hvp(v)
    assert "hardsigmoid" not in ref_op.hvp_method
    assert torch.linalg.vector_norm(hv - ref) <= 1e-10 * torch.linalg.vector_norm(ref)


def test_batchnorm_at_init_uses_batch_statistics_until_it_has_seen_data(tmp_path):
    """A fresh torchvision ResNet's BatchNorms are the identity in eval mode: ``--bn auto``
    probes them with batch statistics; after one training step they keep their own."""
    (fresh,) = _probe("jacobian", "tv_resnet18", tmp_path / "a")
    (running,) = _probe("jacobian", "tv_resnet18", tmp_path / "b", "--bn", "running")
    assert fresh["bn"] == "batch, held fixed" and running["bn"] == "running"
    assert abs(fresh["sv_max"] - running["sv_max"]) > 0.1 * running["sv_max"]


def test_hugging_face_outputs_are_chosen_by_key(tmp_path, capsys):
    rows = _probe("norms", "hf_bert", tmp_path / "a", "--output", "logits")
    assert [r["block"] for r in rows] == BLOCKS["hf_bert"]
    argv = ["probe", "norms", "--model-file", f"{FILE}:hf_bert", "--input-shape", "tokens:16",
            "--num-samples", "8", "--output", "pooler", "--out", str(tmp_path / "b")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "SequenceClassifierOutput with tensors logits" in err and "\n" not in err


def test_token_shape_takes_the_vocabulary_from_the_config(tmp_path):
    from argparse import Namespace

    from pnnh.probes.common import _batch_for, parse_input_shape

    model = em.hf_gpt2()
    x, y = _batch_for(model, Namespace(num_samples=4, output=None),
                      parse_input_shape("tokens:16"), 0)
    assert x.dtype == torch.int64 and x.shape == (4, 16) and int(x.max()) < 100
    assert y.shape == (4, 16) and int(y.max()) < 100  # one label per position of the LM head


def _docs_commands() -> list[tuple[str, str]]:
    import test_docs_commands as docs  # the docs' commands, as tests/test_docs_commands.py reads them

    return [(where, cmd) for where, cmd in docs.COMMANDS
            if cmd.startswith("pnnh ") and "tests/ecosystem_models.py" in cmd]


@pytest.mark.parametrize("where,cmd", _docs_commands())
def test_the_docs_commands_for_real_models_run(where, cmd, tmp_path, monkeypatch):
    """README.md's and docs/PROBES.md's one-command-per-library examples, as written."""
    import shlex
    import shutil

    monkeypatch.chdir(tmp_path)
    (tmp_path / "tests").mkdir()
    shutil.copy(HERE / "ecosystem_models.py", tmp_path / "tests" / "ecosystem_models.py")
    assert main(shlex.split(cmd)[1:]) == 0, where
