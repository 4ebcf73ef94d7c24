"""Model families: registry names, shapes, depth = number of weight layers, blocks, identity at
init, parameter counts checked against formulas and torchvision."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pnnh import count_parameters, create_model, list_models, model_info
from pnnh.coder import PNNHBlock, ProjectionCoder
from pnnh.errors import ConfigError
from pnnh.export import to_plain

FAMILIES = {
    "mlp": (("plain_mlp", "resnet_mlp", "pnnh_mlp"), (1, 40), {}),
    "cnn1d": (("plain_cnn1d", "resnet_cnn1d", "pnnh_cnn1d"), (1, 40), {"width": 8}),
    "cifar": (("plain20", "resnet20", "pnnh20"), (3, 32, 32), {"width": 4}),
    "imagenet": (("plain18", "resnet18", "pnnh18"), (3, 32, 32), {"width": 4}),
}


def test_registry_lists_every_family_and_kind():
    names = set(list_models())
    for d in (20, 56, 110):
        assert {f"plain{d}", f"resnet{d}", f"pnnh{d}"} <= names
    for fam, (models, _, _) in FAMILIES.items():
        for name, kind in zip(models, ("plain", "resnet", "pnnh")):
            info = model_info(name)
            assert (info.family, info.kind) == (fam, kind)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_forward_shapes_and_blocks(family):
    models, in_shape, kw = FAMILIES[family]
    for name in models:
        m = create_model(name, in_shape=in_shape, num_classes=7, **kw)
        assert m(torch.randn(2, *in_shape)).shape == (2, 7)
        assert isinstance(m.blocks, nn.Sequential) and len(m.blocks) > 0


@pytest.mark.parametrize("name,depth,kw", [
    ("plain_mlp", 32, {}), ("pnnh_mlp", 32, {}), ("plain_cnn1d", 8, {}), ("pnnh_cnn1d", 32, {}),
    ("plain20", 20, {"width": 4}), ("pnnh56", 56, {"width": 4}), ("plain110", 110, {"width": 2}),
    ("plain18", 18, {"width": 4}), ("pnnh18", 18, {"width": 4}),
])
def test_depth_counts_weight_layers(name, depth, kw):
    """In plain form, a model of depth N is exactly N Linear/Conv layers."""
    in_shape = (3, 32, 32) if name[-2:].isdigit() else (1, 40)
    m = create_model(name, in_shape=in_shape, depth=depth if not name[-2:].isdigit() else None,
                     **kw).eval()
    layers = [x for x in to_plain(m) if isinstance(x, (nn.Linear, nn.Conv1d, nn.Conv2d))]
    assert len(layers) == depth


def test_cifar_transitions_are_marked():
    for name in ("plain20", "resnet20", "pnnh20"):
        m = create_model(name, width=4)
        flags = [getattr(b, "transition", False) for b in m.blocks]
        assert flags == [False] * 3 + [True] + [False] * 2 + [True] + [False] * 2
        for b in m.blocks:
            if b.transition and name != "pnnh20":
                assert b.conv1.stride == (2, 2)
    r = create_model("resnet20", width=4)
    assert isinstance(r.blocks[3].shortcut[0], nn.Conv2d)
    assert isinstance(r.blocks[0].shortcut, nn.Identity)


def test_parameter_counts():
    assert count_parameters(create_model("resnet18")) == 11_689_512  # torchvision's resnet18
    # CIFAR ResNet-20 with 1x1 projection shortcuts (He et al. report 0.27M)
    assert 0.26e6 < count_parameters(create_model("resnet20")) < 0.28e6
    # pnnh_mlp per block: E (l·n + l) + D (n·l) + b2 (n); the default fixed coder A is a buffer
    n, lw, blocks = 128, 64, 49
    pnnh = count_parameters(create_model("pnnh_mlp", depth=100, width=n, learner_width=lw))
    res = count_parameters(create_model("resnet_mlp", depth=100, width=n))
    stem_head = 40 * n + n + n * 10 + 10
    assert pnnh == stem_head + blocks * (lw * n + lw + n * lw + n)
    assert res == stem_head + blocks * 2 * (n * n + n)
    # a trainable coder adds A (n·n); coder ratio 0.5 halves it
    ns = count_parameters(create_model("pnnh_mlp", depth=100, width=n, learner_width=lw,
                                       coder_constraint="newton_schulz"))
    assert ns - pnnh == blocks * n * n
    half = count_parameters(create_model("pnnh_mlp", depth=100, width=n, learner_width=lw,
                                         coder_ratio=0.5, coder_constraint="newton_schulz"))
    assert ns - half == blocks * n * n // 2


@pytest.mark.parametrize("pnnh,resnet,kw", [
    ("pnnh_mlp", "resnet_mlp", {"depth": 100}),
    ("pnnh_cnn1d", "resnet_cnn1d", {"depth": 100}),
    ("pnnh20", "resnet20", {}),
    ("pnnh56", "resnet56", {}),
    ("pnnh110", "resnet110", {}),
    ("pnnh18", "resnet18", {"in_shape": (3, 32, 32), "num_classes": 10}),
])
def test_pnnh_defaults_have_the_parameters_of_the_resnet(pnnh, resnet, kw):
    """Default PNNH: fixed identity coders (buffers), learner width = width, and on BatchNorm
    CNNs a learned 1x1 ``S`` + BatchNorm at each transition: the ResNet's parameters exactly."""
    p, r = create_model(pnnh, **kw), create_model(resnet, **kw)
    assert count_parameters(p) == count_parameters(r)
    coders = [m for name, m in p.named_modules() if name.endswith("coder")]
    inner = [c for c in coders if not isinstance(c, ProjectionCoder)]
    assert inner and all(not any(True for _ in c.parameters()) for c in inner)
    assert all(c.weight.requires_grad for c in coders if isinstance(c, ProjectionCoder))
    assert not hasattr(p, "coder_constraint")  # no per-step hook or extra loss


@pytest.mark.parametrize("name,in_shape,kw", [
    ("pnnh_mlp", (1, 40), {"depth": 32}),
    ("pnnh_cnn1d", (1, 40), {"depth": 32, "width": 8}),
])
def test_pnnh_net_without_normalization_is_stem_then_head_at_init(name, in_shape, kw):
    """Every block is the identity at init on the (non-negative) stem output."""
    torch.manual_seed(0)
    m = create_model(name, in_shape=in_shape, **kw)
    x = torch.randn(4, *in_shape)
    assert torch.allclose(m(x), m.head(m.stem(x)), atol=1e-4)
    plain = create_model(name.replace("pnnh", "plain"), in_shape=in_shape, **kw)
    assert not torch.allclose(plain(x), plain.head(plain.stem(x)), atol=1e-2)


def test_pnnh_cifar_blocks_at_init():
    """With BatchNorm the learner's last BatchNorm starts at scale 1 (the He-init ResNet's
    branch) and transitions normalise their carry; with ``zero_init_decoder=True``
    non-transition blocks start as the identity on x >= 0 (eval)."""
    m = create_model("pnnh20", width=4).eval()
    zero = create_model("pnnh20", width=4, zero_init_decoder=True).eval()
    for b, z in zip(m.blocks, zero.blocks):
        assert isinstance(b, PNNHBlock)
        assert torch.all(b.bn2.weight == 1) and torch.all(z.bn2.weight == 0)
        assert (b.carry_bn is not None) == b.transition
        x = torch.rand(2, b.coder.in_dim, 8, 8)
        if not b.transition:
            assert torch.allclose(z(x), x, atol=1e-5)
            assert not torch.allclose(b(x), x, atol=1e-3)


def test_model_options_and_errors():
    m = create_model("pnnh_mlp", depth=8, coder_constraint="procrustes", project_every=4)
    assert (m.coder_constraint.mode, m.coder_constraint.project_every) == ("procrustes", 4)
    assert create_model("pnnh20", width=4, procrustes=True).coder_constraint.mode == "procrustes"
    with pytest.raises(ConfigError, match="depth"):
        create_model("pnnh_mlp", depth=9)
    with pytest.raises(ConfigError, match="depth"):
        create_model("resnet20", depth=21)
    with pytest.raises(ConfigError, match="depth"):
        create_model("pnnh18", depth=19)
    with pytest.raises(ConfigError, match="coder_constraint"):
        create_model("pnnh_cnn1d", coder_constraint="bogus")
    with pytest.raises(ConfigError, match="coder_ratio"):
        create_model("pnnh_mlp", coder_ratio=-1)
    with pytest.raises(ConfigError):
        create_model("plain_cnn1d", in_shape=(3, 32, 32))


def test_imagenet_stem_follows_input_size():
    small = create_model("resnet18", in_shape=(3, 32, 32), width=4)
    large = create_model("resnet18", in_shape=(3, 64, 64), width=4)
    assert small.stem[0].kernel_size == (3, 3)
    assert large.stem[0].kernel_size == (7, 7)
    assert isinstance(large.stem[-1], nn.MaxPool2d)
    assert large(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


def test_pnnh_accuracy_experiment_smoke(tmp_path):
    """The experiment's plumbing at its quick scale: rows, table, ablation, plot, reuse."""
    import json

    from pnnh.reproduce import pnnh_accuracy as exp

    summary = exp.run(tmp_path, "quick", "cpu", 0)
    assert [r["kind"] for r in summary["rows"]] == ["plain", "resnet", "pnnh"]
    # default PNNH (fixed coder, learner width = width) has the zero-init ResNet's parameters
    assert summary["rows"][2]["params"] == summary["rows"][1]["params"]
    assert "| mlp | 8 |" in summary["table"]
    assert len(summary["ablation"]) == 2
    assert [len(r["final_test_acc"]) for r in summary["seeds"]] == [2, 2, 2]
    for f in ("results.csv", "results.json", "ablation.csv", "seeds.csv", "accuracy_vs_depth.png"):
        assert (tmp_path / f).stat().st_size > 0
    # the default ablation variant is the main study's PNNH run, reused
    assert summary["ablation"][0]["final_test_acc"] == summary["rows"][2]["final_test_acc"]
    resnet = json.loads((tmp_path / "runs" / "resnet_mlp_zero_init_d8" / "summary.json").read_text())
    assert resnet["model_args"] == {"zero_init_residual": True}


# --------------------------------------------------------------------------- registry shape


def test_every_name_is_a_function_of_that_name():
    """One ``@register_model`` function per public name (``def resnet56`` exists), and the
    shared blocks come from one module."""
    import importlib

    from pnnh.models import layers

    for name in list_models():
        factory = model_info(name).factory
        assert factory.__name__ == name
        assert getattr(importlib.import_module(factory.__module__), name) is factory
    from pnnh.models.cifar import ConvNet
    from pnnh.models.cnn1d import CNN1d
    from pnnh.models.mlp import MLP
    from pnnh.models.procrustes import StagedResNetMLP
    from pnnh.models.vit import ViT

    for cls in (MLP, CNN1d, ConvNet, ViT, StagedResNetMLP):
        assert issubclass(cls, layers.StemBlocksHead) and "forward" not in vars(cls), cls


def test_coder_options_are_one_object_and_options_of_the_model():
    from pnnh.coder import DEFAULT_CODER, CoderOptions
    from pnnh.models.vit import VIT_CODER

    fields = ["coder_ratio", "coder_kernel", "coder_init", "coder_constraint", "project_every",
              "penalty_weight", "zero_init_decoder", "transition_norm", "transition_coder",
              "fused", "procrustes"]
    assert model_info("pnnh20").parameters()[-len(fields):] == fields
    mlp = model_info("pnnh_mlp").parameters()
    assert "coder_kernel" not in mlp and "transition_norm" not in mlp  # no convs, no transitions
    assert "transition_coder" not in mlp
    assert mlp[-8:] == [f for f in fields
                        if f not in ("coder_kernel", "transition_norm", "transition_coder")]
    with pytest.raises(ConfigError, match="pnnh_mlp' does not take option.s. coder_kernel"):
        create_model("pnnh_mlp", coder_kernel=3)
    with pytest.raises(ConfigError, match="does not take option.s. coder_kernel"):
        create_model("pnnh_mlp", coder_kernel=None)  # unknown whatever its value
    assert create_model("pnnh_mlp", depth=None, width=None, coder_ratio=None) is not None
    m = create_model("pnnh_mlp", depth=4, width=8, coder_constraint="penalty", penalty_weight=0.5,
                     project_every=3, coder_ratio=0.5, fused=False)
    assert (m.coder_constraint.mode, m.coder_constraint.penalty_weight) == ("penalty", 0.5)
    assert all(not b.fused and b.coder.width == 4 for b in m.blocks)
    # the same model from Python, with the object
    from pnnh.models.mlp import pnnh_mlp

    torch.manual_seed(0)
    a = pnnh_mlp(depth=4, width=8, coder=CoderOptions(coder_ratio=0.5, fused=False))
    torch.manual_seed(0)
    b = create_model("pnnh_mlp", depth=4, width=8, coder_ratio=0.5, fused=False)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    # each family keeps its own defaults; CoderOptions is frozen
    vit = create_model("pnnh_vit_tiny", depth=1, width=8, heads=2)
    # None: zero without BatchNorm (MLP, 1-D CNN), scale 1 with it (CNNs); the ViT: not zero
    assert VIT_CODER.zero_init_decoder is False and DEFAULT_CODER.zero_init_decoder is None
    assert vit.blocks[0].mlp.fc2.weight.abs().sum() > 0  # the ViT's own default: not zeroed
    assert not hasattr(vit, "coder_constraint")  # both fixed (A = I): nothing to project
    trained = create_model("pnnh_vit_tiny", depth=1, width=8, heads=2,
                           coder_constraint="newton_schulz")
    assert trained.coder_constraint.mode == "newton_schulz"
    assert not hasattr(create_model("pnnh_mlp", depth=4, width=8), "coder_constraint")
    with pytest.raises(AttributeError):
        DEFAULT_CODER.coder_ratio = 2.0  # type: ignore[misc]


def test_register_model_checks_the_options_parameter():
    from pnnh.coder import CoderOptions
    from pnnh.registry import register_model

    def no_options(in_shape=(1, 4), num_classes: int = 2):
        return nn.Linear(4, 2)

    with pytest.raises(ValueError, match="no parameter defaulting to a CoderOptions"):
        register_model(family="mlp", kind="pnnh", options=CoderOptions)(no_options)


def test_an_experiment_reuses_a_finished_run_only_of_the_same_configuration(tmp_path):
    """``pnnh_accuracy._run`` (also deep-plain's runner) returns a finished run's summary when
    the stored configuration is the one asked for, and trains afresh when any field that
    changes the numbers differs (here the learning rate), never returning the old result."""
    from pnnh.reproduce.pnnh_accuracy import _run

    config = {"model": "plain_mlp", "depth": 4, "width": 8, "epochs": 1, "num_samples": 200,
              "max_steps_per_epoch": 2, "lr": 1e-3}
    first = _run(tmp_path / "r", config, "cpu", 0)
    again = _run(tmp_path / "r", config, "cpu", 0)
    assert again == first  # reused: the very same summary, time included
    other = _run(tmp_path / "r", {**config, "lr": 0.05}, "cpu", 0)
    assert other["time_s"] != first["time_s"] and other["status"] == "finished"
    stored = (tmp_path / "r" / "config.yaml").read_text()
    assert "lr: 0.05" in stored
    assert _run(tmp_path / "r", {**config, "lr": 0.05}, "cpu", 0) == other


def test_a_pnnh_cnn_checkpoint_from_before_the_learned_transitions_still_loads(tmp_path):
    """Checkpoints record the model's options, and those written before the learned 1x1
    transition became the BatchNorm CNN default have none for it: they hold the fixed 2x2 ``P``
    and load as the model they were; a checkpoint that fits neither is still refused."""
    from pnnh.checkpoint import load_model, save_checkpoint
    from pnnh.coder import DownsampleCoder
    from pnnh.errors import CheckpointError

    old = create_model("pnnh20", width=4, transition_coder="orthogonal").eval()
    save_checkpoint(tmp_path / "old.pt", {"model_name": "pnnh20", "model_kwargs": {"width": 4},
                                          "model": old.state_dict()})
    model, _ = load_model(tmp_path / "old.pt")
    assert any(isinstance(b.coder, DownsampleCoder) for b in model.blocks)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), old(x))
    new = create_model("pnnh20", width=4)
    save_checkpoint(tmp_path / "new.pt", {"model_name": "pnnh20", "model_kwargs": {"width": 4},
                                          "model": new.state_dict()})
    assert any(isinstance(b.coder, ProjectionCoder) for b in load_model(tmp_path / "new.pt")[0].blocks)
    save_checkpoint(tmp_path / "bad.pt", {"model_name": "pnnh20", "model_kwargs": {"width": 8},
                                          "model": new.state_dict()})
    with pytest.raises(CheckpointError, match="weights do not fit model 'pnnh20'"):
        load_model(tmp_path / "bad.pt")
