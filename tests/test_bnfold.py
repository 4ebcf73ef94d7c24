"""Eval-mode BatchNorm folding inside the Hessian's loss: which pairs fold, and that the
Hessian (dense, float64) is unchanged by it."""

from __future__ import annotations

import torch
from torch import nn

from pnnh.models import create_model
from pnnh.probes.bnfold import foldable_pairs, folded
from pnnh.probes.hessian import HessianOperator


def _randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Running statistics and affine parameters far from the identity (a fresh BatchNorm is
    nearly the identity in eval mode, which would hide a wrong fold)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g))
            m.running_var.copy_(0.5 + torch.rand(n, generator=g))
            if m.affine:
                m.weight.data.copy_(1 + 0.5 * torch.randn(n, generator=g))
                m.bias.data.copy_(0.3 * torch.randn(n, generator=g))
    return model.eval()


class ConvBN(nn.Module):
    """conv→BN (folds), conv(bias)→BN(no affine) (folds), a conv whose output feeds a BN *and*
    a skip (must not fold), linear→BatchNorm1d (folds)."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(2, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3)
        self.c2, self.b2 = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3, affine=False)
        self.c3, self.b3 = nn.Conv2d(3, 3, 1, bias=False), nn.BatchNorm2d(3)
        self.fc, self.b4 = nn.Linear(3, 4), nn.BatchNorm1d(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.b1(self.c1(x)))
        h = torch.tanh(self.b2(self.c2(h)))
        z = self.c3(h)
        h = torch.tanh(self.b3(z) + 0.5 * z)  # z has two readers
        h = h.mean((2, 3))
        return self.head(torch.tanh(self.b4(self.fc(h))))


class Shared(nn.Module):
    """One conv called twice, once before a BN: must not fold."""

    def __init__(self):
        super().__init__()
        self.c, self.bn = nn.Conv2d(2, 2, 3, padding=1), nn.BatchNorm2d(2)
        self.head = nn.Linear(2, 3)

    def forward(self, x):
        h = torch.tanh(self.bn(self.c(x)))
        return self.head(torch.tanh(self.c(h)).mean((2, 3)))


def _data(dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    return torch.randn(6, 2, 5, 5, generator=g, dtype=dtype), torch.randint(0, 3, (6,), generator=g)


def test_pairs_found_and_refused():
    torch.manual_seed(0)
    model = _randomize_bn(ConvBN())
    x, _ = _data(torch.float32)
    assert foldable_pairs(model, x[:1]) == [("c1", "b1"), ("c2", "b2"), ("fc", "b4")]
    assert foldable_pairs(_randomize_bn(Shared()), x[:1]) == []
    assert foldable_pairs(model.train(), x[:1]) == []  # batch statistics: not affine


def test_folding_only_where_it_pays():
    """By default a pair folds only where the layer's output over the batch has at least as many
    elements as its weight (folding swaps the BatchNorm's activation-sized ops for weight-sized
    ones): ``fc`` (a 3x4 weight, 4 outputs a sample) folds from 3 samples up."""
    torch.manual_seed(0)
    model = _randomize_bn(ConvBN()).double()
    x, y = _data()
    assert foldable_pairs(model, x[:1], batch_size=2) == [("c1", "b1"), ("c2", "b2")]
    assert foldable_pairs(model, x[:1], batch_size=3) == [("c1", "b1"), ("c2", "b2"), ("fc", "b4")]
    op = HessianOperator(model, (x[:2], y[:2]))
    every = HessianOperator(model, (x[:2], y[:2]), fold_batchnorm="all")
    assert op.folded == [("c1", "b1"), ("c2", "b2")] and len(every.folded) == 3
    loader = [(x[:2], y[:2]), (x[2:5], y[2:5])]  # the largest batch decides
    assert len(HessianOperator(model, loader).folded) == 3
    ref = HessianOperator(model, (x[:2], y[:2]), fold_batchnorm=False)
    v = torch.randn(op.dim, dtype=torch.float64)
    assert torch.allclose(op.hvp(v), ref.hvp(v), rtol=1e-10, atol=1e-12)
    assert torch.allclose(every.hvp(v), ref.hvp(v), rtol=1e-10, atol=1e-12)


def test_folded_hessian_equals_the_original_exactly():
    torch.manual_seed(0)
    model = _randomize_bn(ConvBN()).double()
    x, y = _data()
    ref = HessianOperator(model, (x, y), fold_batchnorm=False)
    op = HessianOperator(model, (x, y), fold_batchnorm="all")
    assert len(op.folded) == 3 and not ref.folded
    assert "folded into the layer before it (3 pairs" in (op.hvp(torch.ones(op.dim)), op.hvp_method)[1]
    h_ref, h = ref.dense(), op.dense()  # vmapped forward-over-reverse blocks
    assert torch.allclose(h, h_ref, atol=1e-10, rtol=0)
    vs = torch.randn(5, op.dim, dtype=torch.float64)  # forward-over-forward vᵀHv
    assert torch.allclose(op.quadratic_forms(vs), ref.quadratic_forms(vs), atol=1e-10, rtol=0)
    assert op.quadratic_kind == "fwd-fwd"
    exact = torch.autograd.functional.hessian(lambda t: ref._loss(t, x, y), ref.theta)
    assert torch.allclose(h, 0.5 * (exact + exact.T), atol=1e-10, rtol=0)
    with folded(model, op.folded):  # the swap is undone after the block
        pass
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_registry_resnet_folds_every_conv_bn_pair():
    torch.manual_seed(0)
    model = _randomize_bn(create_model("resnet20", in_shape=(3, 8, 8), num_classes=10)).double()
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3])
    op = HessianOperator(model, (x, y), fold_batchnorm="all")
    ref = HessianOperator(model, (x, y), fold_batchnorm=False)
    convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    assert len(op.folded) == convs
    v = torch.randn(op.dim, dtype=torch.float64)
    assert torch.allclose(op.hvp(v), ref.hvp(v), rtol=1e-9, atol=1e-12)


def test_weight_standardized_conv_subclass_is_not_folded():
    class StdConv(nn.Conv2d):  # timm's StdConv2d pattern: the forward changes the weight
        def forward(self, x):
            w = (self.weight - self.weight.mean((1, 2, 3), keepdim=True))
            return self._conv_forward(x, w, self.bias)

    model = _randomize_bn(nn.Sequential(StdConv(2, 3, 3), nn.BatchNorm2d(3), nn.Flatten(),
                                        nn.Linear(27, 3)))
    x, _ = _data(torch.float32)
    assert foldable_pairs(model, x[:1]) == []


def test_a_hook_that_changes_the_layer_output_blocks_the_fold():
    """The graph shows one reader, but folding would move the hook after the BatchNorm: the
    output check on one sample refuses the pair."""
    model = _randomize_bn(nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Flatten(),
                                        nn.Linear(27, 3)))
    x, _ = _data(torch.float32)
    assert foldable_pairs(model, x[:1]) == [("0", "1")]
    model[0].register_forward_hook(lambda _m, _i, out: out * 2 + 1)
    assert foldable_pairs(model, x[:1]) == []


def test_cli_folds_by_default_and_the_flag_turns_it_off(tmp_path):
    import json

    from pnnh.cli import main

    common = ["probe", "hessian", "--model", "resnet20", "--width", "4", "--num-samples", "8",
              "--dense", "never", "--tol", "1e-3", "--hutchinson-samples", "4", "--slq-runs",
              "1", "--slq-steps", "3", "--bn", "running"]  # a fresh model: eval-mode BatchNorm
    assert main([*common, "--out", str(tmp_path / "on")]) == 0
    assert main([*common, "--no-fold-batchnorm", "--out", str(tmp_path / "off")]) == 0
    (on,) = json.loads((tmp_path / "on" / "hessian.json").read_text())
    (off,) = json.loads((tmp_path / "off" / "hessian.json").read_text())
    assert on["batchnorm_folded"] == 21 and "21 pairs" in on["method"]
    assert off["batchnorm_folded"] == 0 and "folded" not in off["method"]
    assert abs(on["lambda_max"] - off["lambda_max"]) <= 1e-3 * abs(off["lambda_max"])


class BatchNormAct2d(nn.BatchNorm2d):
    """Written as timm's ``layers/norm_act.py`` writes it: a BatchNorm subclass (so that its
    weights load as a BatchNorm's) whose forward is ``act(drop(batch_norm(x)))``, act in place."""

    def __init__(self, num_features, act_layer=nn.ReLU, drop_layer=None):
        super().__init__(num_features)
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        self.act = act_layer(inplace=True)

    def forward(self, x):
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        x = nn.functional.batch_norm(
            x, self.running_mean if not self.training or self.track_running_stats else None,
            self.running_var if not self.training or self.track_running_stats else None,
            self.weight, self.bias, bn_training, self.momentum or 0.0, self.eps)
        x = self.drop(x)
        return self.act(x)


class ActBeforeNorm(BatchNormAct2d):
    """The same attributes, another order (``BN(act(x))``): folding it would be wrong."""

    def forward(self, x):
        return super().forward(self.act(x.clone()))


def _timm_style(norm=BatchNormAct2d) -> nn.Module:
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, bias=False), norm(3, nn.SiLU),
                         nn.Conv2d(3, 4, 3, padding=1, bias=False), norm(4),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


def test_timm_norm_act_modules_fold_with_their_activation_kept():
    torch.manual_seed(0)
    model = _randomize_bn(_timm_style()).double()
    x, y = _data()
    assert foldable_pairs(model, x[:1]) == [("0", "1"), ("2", "3")]
    ref = HessianOperator(model, (x, y), fold_batchnorm=False)
    op = HessianOperator(model, (x, y), fold_batchnorm="all")
    assert len(op.folded) == 2
    assert torch.allclose(op.dense(), ref.dense(), atol=1e-10, rtol=0)
    with folded(model, op.folded):
        assert "forward" in model[1].__dict__
    assert all("forward" not in m.__dict__ for m in model.modules())
    wrong = _randomize_bn(_timm_style(ActBeforeNorm))
    assert foldable_pairs(wrong, x[:1].float()) == []  # the output check refuses it
