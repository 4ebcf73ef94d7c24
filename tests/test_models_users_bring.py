"""Models as users bring them, in the default suite (no torchvision, timm or transformers here;
tests/test_ecosystem.py runs the real libraries): structured outputs, token ids, a layer stack
under a name we do not know, activations with no double backward, fresh BatchNorms, and a
user's file that fails."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pnnh.cli import main
from pnnh.errors import ConfigError
from pnnh.probes.common import (
    TokenShape,
    bn_statistics,
    cross_entropy,
    find_blocks,
    math_attention,
    parse_input_shape,
    select_output,
)
from pnnh.probes.dissipation import dissipation
from pnnh.probes.hessian import HessianOperator
from pnnh.probes.hessian.substitutes import hardsigmoid
from pnnh.probes.jacobian import input_jacobians, top_singular_values
from pnnh.probes.norms import norms


# ----------------------------------------------------------------------------- a token model
class Layer(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.ff = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)

    def forward(self, x):
        x = self.n1(x + self.attn(x, x, x, need_weights=False)[0])
        return (self.n2(x + self.ff(x)),)  # a tuple, as Hugging Face layers return


class TokenClassifier(nn.Module):
    """Hugging Face's shape without the library: token ids in, a dict-like output with
    ``logits`` out, the layers under a name no rule knows (``stack``)."""

    def __init__(self, vocab: int = 50, d: int = 16, layers: int = 3, classes: int = 3):
        super().__init__()
        self.config = type("Config", (), {"vocab_size": vocab})()
        self.embed = nn.Embedding(vocab, d)
        self.stack = nn.ModuleList([Layer(d) for _ in range(layers)])
        self.head = nn.Linear(d, classes)

    def get_input_embeddings(self):
        return self.embed

    def forward(self, ids):
        h = self.embed(ids)
        for layer in self.stack:
            h = layer(h)[0]
        return OrderedDict(logits=self.head(h.mean(1)), hidden=h)


def _ids(n=6, length=5, vocab=50):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (n, length), generator=g), torch.randint(0, 3, (n,), generator=g)


def test_select_output_takes_logits_then_the_only_tensor_then_says_what_there_is():
    t, u = torch.ones(2), torch.zeros(2)
    assert select_output(t) is t
    assert select_output({"logits": t, "hidden": u}) is t
    assert select_output({"hidden": u}) is u
    assert select_output({"logits": t, "hidden": u}, "hidden") is u
    assert select_output((None, t, u)) is t and select_output((t, u), "1") is u
    with pytest.raises(ConfigError, match="tensors a, b; choose one with --output"):
        select_output({"a": t, "b": u})
    with pytest.raises(ConfigError, match="--output INDEX"):
        select_output((t, u), "5")


def test_token_cross_entropy_is_per_position():
    logits, y = torch.randn(2, 4, 7), torch.randint(0, 7, (2, 4))
    ref = F.cross_entropy(logits.reshape(8, 7), y.reshape(8))
    assert torch.allclose(cross_entropy(logits, y), ref)
    images = torch.randn(3, 5)
    assert torch.allclose(cross_entropy(images, torch.tensor([0, 1, 4])),
                          F.cross_entropy(images, torch.tensor([0, 1, 4])))


def test_token_input_shape_parses_and_refuses_nonsense():
    assert parse_input_shape("tokens:128,vocab=30522") == TokenShape(128, 30522)
    assert parse_input_shape("tokens:16") == TokenShape(16, None)
    for bad in ("tokens:", "tokens:8,vocab=x", "tokens:8,size=3", "tokens:0"):
        with pytest.raises(ConfigError, match="tokens:LENGTH"):
            parse_input_shape(bad)


def test_a_modulelist_of_same_class_blocks_is_the_layer_stack():
    assert [n for n, _ in find_blocks(TokenClassifier())] == ["stack.0", "stack.1", "stack.2"]


def test_every_probe_measures_a_token_model_with_a_dict_output():
    torch.manual_seed(0)
    model, (ids, y) = TokenClassifier().eval(), _ids()
    recs = norms(model, (ids, y))
    assert [r["block"] for r in recs] == ["stack.0", "stack.1", "stack.2"]
    assert all(r["grad_in_norm"] > 0 and r["grad_out_norm"] > 0 for r in recs)
    # The embedding is the input: its Jacobian is exact (against autograd.functional).
    jac = input_jacobians(model, ids[:2])
    e = model.embed(ids[:1]).detach()

    def f(v):
        h = v
        for layer in model.stack:
            h = layer(h)[0]
        return model.head(h.mean(1)).reshape(-1)

    ref = torch.autograd.functional.jacobian(f, e).reshape(3, -1)
    assert jac.shape == (2, 3, 5 * 16) and torch.allclose(jac[0], ref, atol=1e-5)
    top = top_singular_values(model, ids[:2], iters=200, tol=1e-9)
    assert torch.allclose(top[0], torch.linalg.svdvals(ref)[0], rtol=1e-3)
    recs = dissipation(model, ids, batch_size=4)
    assert [r["layer"] for r in recs] == ["stack.0", "stack.1", "stack.2"]
    assert recs[0]["input_r2"] > recs[-1]["input_r2"] - 1  # measured (finite) from the embedding
    op = HessianOperator(model, (ids, y))
    v = torch.randn(op.dim, generator=torch.Generator().manual_seed(1))
    params = dict(model.named_parameters())

    def loss(theta):
        out = torch.func.functional_call(model, op._unflatten(theta), (ids,))
        return F.cross_entropy(out["logits"], y)

    with math_attention():  # the fused CPU attention kernel has no double backward
        ref = torch.autograd.functional.hvp(loss, op.theta, v)[1]
    assert len(params) == len(op.names)
    assert torch.allclose(op.hvp(v), ref, rtol=1e-3, atol=1e-5)


# ----------------------------------------------------------------------------- hardsigmoid
def test_the_hardsigmoid_substitute_is_the_same_function_with_a_second_derivative():
    x = torch.linspace(-5, 5, 1001, dtype=torch.float64)
    x = torch.cat([x, torch.tensor([-3.0, 3.0], dtype=torch.float64)])
    assert torch.equal(hardsigmoid(x), F.hardsigmoid(x))
    xf = torch.randn(10_000) * 4
    assert torch.equal(hardsigmoid(xf), F.hardsigmoid(xf))
    xg = x.clone().requires_grad_(True)
    a = torch.autograd.grad(hardsigmoid(xg).sum(), xg)[0]
    b = torch.autograd.grad(F.hardsigmoid(xg).sum(), xg)[0]
    # The kernel's derivative, kinks included (it multiplies by a float32 1/6, even in float64).
    assert torch.allclose(a, b, rtol=1e-7, atol=0)
    assert torch.equal(a == 0, b == 0)


class SE(nn.Module):
    """MobileNetV3's squeeze-excitation: a hardsigmoid gate."""

    def __init__(self, c=4):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.fc1, self.fc2 = nn.Conv2d(c, 2, 1), nn.Conv2d(2, c, 1)
        self.gate = nn.Hardsigmoid()
        self.head = nn.Linear(c, 3)

    def forward(self, x):
        h = F.hardswish(self.conv(x))
        s = self.gate(self.fc2(F.relu(self.fc1(h.mean((2, 3), keepdim=True)))) * 3)
        return self.head((h * s).mean((2, 3)))


def test_the_hessian_runs_through_hardsigmoid_and_names_the_substitute():
    torch.manual_seed(0)
    model = SE().double().eval()
    x, y = torch.randn(5, 3, 6, 6, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])
    op = HessianOperator(model, (x, y), fold_batchnorm=False)
    dense = op.dense()

    def relu6_model(theta):  # hardsigmoid written with relu6, which PyTorch differentiates twice
        sub = {"hardsigmoid": lambda t, inplace=False: F.relu6(t + 3) / 6}
        orig = F.hardsigmoid
        F.hardsigmoid = sub["hardsigmoid"]
        try:
            out = torch.func.functional_call(model, op._unflatten(theta), (x,))
        finally:
            F.hardsigmoid = orig
        return F.cross_entropy(out, y)

    ref = torch.autograd.functional.hessian(relu6_model, op.theta)
    assert torch.allclose(dense, ref, atol=1e-10)
    assert "hardsigmoid computed by an exact substitute" in op.hvp_method
    assert F.hardsigmoid is torch.nn.functional.hardsigmoid  # restored
    with pytest.raises(RuntimeError, match="hardsigmoid_backward"):  # PyTorch itself cannot
        g = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()),
                                create_graph=True)
        torch.autograd.grad(sum(t.sum() for t in g), list(model.parameters()))


# ----------------------------------------------------------------------------- BatchNorm
def _bn_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3),
                         nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3)).eval()


def test_fresh_batchnorms_run_on_batch_statistics_and_are_restored():
    model, x = _bn_net(), torch.randn(8, 3, 8, 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with bn_statistics(model, "auto") as how:
        out = model(x)
    assert how == "batch"
    ref = model.train()(x)
    model.load_state_dict(before)
    model.eval()
    assert torch.allclose(out, ref)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert not any(m.training for m in model.modules())
    with bn_statistics(model, "running") as how:
        assert torch.allclose(model(x), _bn_net()(x)) and how == "running"
    model[1].num_batches_tracked += 1  # a BatchNorm that saw data: auto keeps its statistics
    model[1].running_mean += 0.1
    with bn_statistics(model, "auto") as how:
        assert model[1].training is False and model[4].training is True
    with bn_statistics(model, "batch", fixed_on=x) as how:
        fixed = model(x[:3])  # samples independent: a sub-batch gives the same rows
        assert how == "batch, held fixed" and torch.allclose(fixed, model(x)[:3], atol=1e-6)
    with pytest.raises(ConfigError, match="--bn"):
        with bn_statistics(model, "sometimes"):
            pass


def test_probe_cli_records_which_statistics_ran(tmp_path, capsys):
    base = ["--model", "resnet20", "--width", "4", "--input-shape", "3,8,8", "--num-samples",
            "16"]
    assert main(["probe", "norms", *base, "--out", str(tmp_path / "a")]) == 0
    assert "batch statistics for the BatchNorms whose running statistics never saw data" \
        in capsys.readouterr().out
    rows = json.loads((tmp_path / "a" / "norms.json").read_text())
    assert {r["bn"] for r in rows} == {"batch"}
    assert main(["probe", "norms", *base, "--bn", "running", "--out", str(tmp_path / "b")]) == 0
    running = json.loads((tmp_path / "b" / "norms.json").read_text())
    assert {r["bn"] for r in running} == {"running"}
    assert [r["ratio"] for r in rows] != [r["ratio"] for r in running]
    assert main(["probe", "jacobian", *base, "--bn", "batch", "--out", str(tmp_path / "c")]) == 0
    assert json.loads((tmp_path / "c" / "jacobian.json").read_text())[0]["bn"] == \
        "batch, held fixed"


# ----------------------------------------------------------------------------- the user's file
BROKEN = {
    "import": "import torchvision_that_is_not_there\n\ndef make():\n    return None\n",
    "factory": "def make():\n    raise ValueError('width must be even')\n",
    "forward": textwrap.dedent("""
        import torch
        from torch import nn

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(4, 2)

            def forward(self, x):
                raise RuntimeError('expected a dict of tensors')

        def make():
            return Net()
        """),
}
SAYS = {
    "import": "importing {file} failed: ModuleNotFoundError: No module named "
              "'torchvision_that_is_not_there'",
    "factory": "make() in {file} raised ValueError: width must be even",
    "forward": "forward on a batch of shape (4,) raised RuntimeError: expected a dict of tensors",
}


@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_a_users_file_that_fails_is_one_line_exit_2(kind, tmp_path):
    file = tmp_path / "user.py"
    file.write_text(BROKEN[kind])
    argv = [sys.executable, "-m", "pnnh", "probe", "norms", "--model-file", f"{file}:make",
            "--input-shape", "4", "--num-samples", "4", "--out", str(tmp_path / "o")]
    env = {k: v for k, v in os.environ.items() if k != "PNNH_DEBUG"}
    r = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert SAYS[kind].format(file=file) in r.stderr
    r = subprocess.run(argv, capture_output=True, text=True, env={**env, "PNNH_DEBUG": "1"},
                       timeout=120)
    assert r.returncode == 2 and "Traceback" in r.stderr and SAYS[kind].format(file=file) in r.stderr


def test_token_models_through_the_cli(tmp_path, capsys):
    file = tmp_path / "tok.py"
    file.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(os.path.dirname(__file__))!r})
        from test_models_users_bring import TokenClassifier

        def make():
            return TokenClassifier()
        """))
    for probe in ("norms", "dissipation", "jacobian", "hessian"):
        out = tmp_path / probe
        argv = ["probe", probe, "--model-file", f"{file}:make", "--input-shape", "tokens:6",
                "--num-samples", "8", "--out", str(out)]
        if probe == "hessian":
            argv += ["--max-iter", "8", "--hutchinson-samples", "4", "--slq-runs", "1",
                     "--slq-steps", "4"]
        assert main(argv) == 0, capsys.readouterr().err
        rows = json.loads((out / f"{probe}.json").read_text())
        assert rows and all(r["bn"] == "none" for r in rows)
    assert main(["probe", "norms", "--model", "plain_mlp", "--input-shape", "tokens:6",
                 "--out", str(tmp_path / "x")]) == 2
    assert "token ids are for --model-file" in capsys.readouterr().err


SE_RESNET = textwrap.dedent("""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, c=4):
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)
            self.fc1, self.fc2 = nn.Conv2d(c, 2, 1), nn.Conv2d(2, c, 1)

        def forward(self, x):
            h = self.conv2(torch.relu(self.conv1(x)))
            s = torch.sigmoid(self.fc2(torch.relu(self.fc1(h.mean((2, 3), keepdim=True)))))
            return torch.relu(x + h * s)

    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), Block(), Block(), nn.Flatten(),
                             nn.LazyLinear(3))
    """)


def test_probe_skips_keeps_residual_connections_and_gates_apart(tmp_path, capsys):
    file = tmp_path / "se.py"
    file.write_text(SE_RESNET)
    out = tmp_path / "s"
    assert main(["probe", "skips", "--model-file", f"{file}:make", "--input-shape", "3,8,8",
                 "--num-samples", "4", "--out", str(out)]) == 0
    assert "se:make: 2 residual connection(s), 2 gate(s) [torch.fx]" in capsys.readouterr().out
    rows = json.loads((out / "skips.json").read_text())
    assert sorted(r["kind"] for r in rows) == ["gate", "gate", "identity", "identity"]
    assert all("bn" not in r for r in rows)
