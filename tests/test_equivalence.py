"""PNNH at r = 1 is a post-activation ResNet whose branch is the learner (docs/PNNH.md,
"The equivalence"): pnnh_to_resnet / resnet_to_pnnh give the same function, the same learner
gradients and the same training curve."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from _helpers import trained_like
from torch import nn

from pnnh import create_model
from pnnh.coder import ProjectionCoder
from pnnh.convert import FixedProjection, pnnh_to_resnet, resnet_to_plain, resnet_to_pnnh
from pnnh.errors import PnnhError

PNNH_CASES = [
    ("pnnh_mlp", (1, 40), {"depth": 8, "width": 16}),
    ("pnnh_mlp", (1, 40), {"depth": 8, "width": 16, "learner_width": 8}),
    ("pnnh_cnn1d", (1, 40), {"depth": 8, "width": 8}),
    ("pnnh20", (3, 32, 32), {"width": 4}),
    ("pnnh18", (3, 32, 32), {"width": 4}),
    ("pnnh18", (3, 64, 64), {"width": 4}),
    # transitions through the fixed co-isometry P instead of the learned projection S
    ("pnnh20", (3, 32, 32), {"width": 4, "transition_coder": "orthogonal"}),
    # a trained orthogonal coder: any A with AᵀA = I maps to the same ResNet
    ("pnnh_mlp", (1, 40), {"depth": 8, "width": 16, "coder_constraint": "newton_schulz"}),
]
RESNET_CASES = [
    ("resnet_mlp", (1, 40), {"depth": 8, "width": 16}),
    ("resnet_cnn1d", (1, 40), {"depth": 8, "width": 8}),
    ("resnet20", (3, 32, 32), {"width": 4}),
    ("resnet18", (3, 32, 32), {"width": 4}),
]


def _learner_pairs(pnnh: nn.Module, resnet: nn.Module):
    """(PNNH parameter, ResNet parameter) for every learner weight, in block order."""
    pairs = []
    for p, r in zip(pnnh.blocks, resnet.blocks):
        l1, l2 = (r.conv1, r.conv2) if hasattr(r, "conv1") else (r.fc1, r.fc2)
        pairs += [(p.enc.weight, l1.weight), (p.dec.weight, l2.weight)]
        if p.bias is not None:
            pairs += [(p.bias, l2.bias)]
        if isinstance(p.bn2, nn.BatchNorm2d):
            pairs += [(p.bn1.weight, r.bn1.weight), (p.bn2.bias, r.bn2.bias)]
    return pairs


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("name,in_shape,kw", PNNH_CASES)
def test_pnnh_to_resnet_same_outputs_and_learner_gradients(name, in_shape, kw, mode):
    torch.manual_seed(0)
    pnnh = trained_like(create_model(name, in_shape=in_shape, **kw)).train(mode == "train")
    if hasattr(pnnh, "coder_constraint"):  # a trainable coder, moved off orthogonal: project
        for _ in range(4):
            pnnh.coder_constraint.project()
    resnet = pnnh_to_resnet(pnnh)
    assert not any(hasattr(b, "coder") for b in resnet.blocks)
    for b, orig in zip(resnet.blocks, pnnh.blocks):
        if getattr(b, "transition", False):  # S: the ResNet's own conv + BN; P: a FixedProjection
            learned = isinstance(orig.coder, ProjectionCoder)
            assert isinstance(b.shortcut, nn.Sequential if learned else FixedProjection)
    x = torch.randn(4, *in_shape)
    yp, yr = pnnh(x), resnet(x)
    assert yp.abs().max() > 0.1
    assert torch.allclose(yp, yr, atol=1e-5)
    yp.sin().sum().backward()
    yr.sin().sum().backward()
    pairs = _learner_pairs(pnnh, resnet)
    assert pairs
    for p, r in pairs:
        assert torch.allclose(p.grad, r.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name,in_shape,kw", RESNET_CASES)
def test_resnet_to_pnnh_same_outputs(name, in_shape, kw):
    """Identity shortcuts become fixed identity coders, projection shortcuts (1x1 stride-2
    conv + BN) a learned :class:`ProjectionCoder` holding ``S`` with the BN as ``carry_bn``:
    exact in train and eval mode."""
    torch.manual_seed(0)
    resnet = trained_like(create_model(name, in_shape=in_shape, **kw))
    pnnh = resnet_to_pnnh(resnet)
    x = torch.randn(4, *in_shape)
    with torch.no_grad():
        y = resnet(x)
        assert y.abs().max() > 0.1
        assert torch.allclose(pnnh(x), y, atol=1e-5)
    for b in pnnh.blocks:
        if b.transition:
            assert isinstance(b.coder, ProjectionCoder) and b.coder.weight.requires_grad
    back = pnnh_to_resnet(pnnh.eval())
    with torch.no_grad():
        assert torch.allclose(back.eval()(x), y, atol=1e-5)
        # batch statistics (this updates the running ones, so last)
        assert torch.allclose(pnnh.train()(x), resnet.train()(x), atol=1e-5)


@pytest.mark.parametrize("name,in_shape,kw", [c for c in PNNH_CASES
                                               if c[0] in ("pnnh20", "pnnh18")])
def test_round_trip_through_the_resnet_keeps_transitions(name, in_shape, kw):
    """PNNH -> ResNet -> PNNH and ResNet -> plain: a transition's shortcut (the learned ``S x``
    as the ResNet's conv + BN, or the fixed ``P x`` as a FixedProjection) comes back as its
    coder, of the same kind, trainable or fixed as it was, and embeds in the plain 3x3 kernel."""
    torch.manual_seed(0)
    pnnh = trained_like(create_model(name, in_shape=in_shape, **kw)).eval()
    resnet = pnnh_to_resnet(pnnh)
    back = resnet_to_pnnh(resnet)
    x = torch.randn(4, *in_shape)
    with torch.no_grad():
        y = pnnh(x)
        assert y.abs().max() > 0.1
        assert torch.allclose(back.eval()(x), y, atol=1e-5)
        # the plain net folds every BatchNorm (the transitions' too) into its convolutions: the
        # same function re-associated, float32 rounding of ~u per operation through ~20 layers,
        # relative to the output's scale (logits ~50 here)
        tol = 1e-5 * max(1.0, float(y.abs().max()))
        assert torch.allclose(resnet_to_plain(resnet)(x), y, atol=tol, rtol=0)
    for b, orig in zip(back.blocks, pnnh.blocks):
        if orig.transition:
            assert type(b.coder) is type(orig.coder)
            assert torch.equal(b.coder.weight, orig.coder.weight)
            learned = isinstance(orig.coder, ProjectionCoder)
            assert b.coder.weight.requires_grad == learned  # S trains, the default P is fixed


def test_a_coder_that_is_not_orthogonal_is_refused():
    model = create_model("pnnh_mlp", depth=4, width=8, coder_ratio=0.5)
    with pytest.raises(PnnhError, match="AᵀA != I"):
        pnnh_to_resnet(model)
    with pytest.raises(PnnhError, match="stem/blocks/head"):
        pnnh_to_resnet(nn.Linear(2, 2))


def _loss_curve(model, xs, ys, opt_name, steps):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = (torch.optim.SGD(params, lr=0.05, momentum=0.9) if opt_name == "sgd"
           else torch.optim.AdamW(params, lr=1e-3))
    losses = []
    for i in range(steps):
        loss = F.cross_entropy(model(xs[i % len(xs)]), ys[i % len(ys)])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return torch.tensor(losses)


# Tolerance: both models run the same float32 operations on the same values (x + branch, then
# ReLU; the transition's P x as a padded or unpadded 2x2 conv), so on one machine the curves
# come out bitwise equal (measured: max relative difference 0.0 in all six cases). Kernels that
# associate sums differently (other BLAS, thread counts) would add ~1e-7 relative per step, which
# 100 steps do not grow past 1e-4; a different start differs by 4e-2 to 1e2 relative.
CURVE_RTOL = 1e-4


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
@pytest.mark.parametrize("name,in_shape,kw", [
    ("pnnh_mlp", (1, 40), {"depth": 12, "width": 16}),
    ("pnnh_cnn1d", (1, 40), {"depth": 8, "width": 8}),
    ("pnnh20", (3, 8, 8), {"width": 4}),
])
def test_100_training_steps_follow_the_same_loss_curve(name, in_shape, kw, opt):
    torch.manual_seed(0)
    pnnh = create_model(name, in_shape=in_shape, **kw)
    resnet = pnnh_to_resnet(pnnh)
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(16, *in_shape, generator=g) for _ in range(4)]
    ys = [torch.randint(0, 10, (16,), generator=g) for _ in range(4)]
    lp = _loss_curve(pnnh, xs, ys, opt, 100)
    lr = _loss_curve(resnet, xs, ys, opt, 100)
    assert lp[-1] < 0.8 * lp[0]  # it trained
    assert torch.allclose(lp, lr, rtol=CURVE_RTOL, atol=1e-6), float((lp - lr).abs().max())
    # a different start is far away: the tolerance can fail
    torch.manual_seed(5)
    other = pnnh_to_resnet(create_model(name, in_shape=in_shape, **kw))
    lo = _loss_curve(other, xs, ys, opt, 100)
    assert not torch.allclose(lp, lo, rtol=CURVE_RTOL, atol=1e-6)


def _sgd_steps(model: nn.Module, xs, ys, steps: int) -> torch.Tensor:
    """``pnnh train``'s SGD: Nesterov momentum, weight decay on weights (ndim > 1) only."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD([{"params": [p for p in params if p.ndim > 1], "weight_decay": 5e-4},
                           {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}],
                          lr=0.05, momentum=0.9, nesterov=True)
    for i in range(steps):
        loss = F.cross_entropy(model(xs[i % len(xs)]), ys[i % len(ys)])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.detach()


@pytest.mark.parametrize("depth", [20, 56])
def test_default_cnn_pnnh_is_the_he_init_resnet_laid_out_plain(depth):
    """With BatchNorm, PNNH's defaults are the He-init ResNet's parametrisation one for one
    (docs/PNNH.md, "Initialisation on BatchNorm CNNs"): the learner's last BatchNorm at scale 1
    (not 0), He ``fan_out`` weights, and at each transition a learned 1x1 stride-2 ``S`` with a
    BatchNorm, carried across the ReLU as ``relu(Sx) - relu(-Sx)``. So the default PNNH CNN
    converts to a model of the registry ResNet's modules and state-dict keys, the registry
    ResNet converts to a model that loads into the default PNNH strictly, both compute the
    same function in train and eval mode, and SGD moves them the same way. Without BatchNorm
    (the MLP) the decoder still starts at zero."""
    torch.manual_seed(0)
    pnnh = create_model(f"pnnh{depth}", in_shape=(1, 28, 28), width=4)
    after_pnnh = torch.rand(3)
    torch.manual_seed(0)
    he = create_model(f"resnet{depth}", in_shape=(1, 28, 28), width=4)
    assert torch.equal(torch.rand(3), after_pnnh)  # the global RNG moved alike
    twin = copy.deepcopy(pnnh).double()  # before any forward pass moves its BatchNorm statistics
    resnet = pnnh_to_resnet(pnnh)
    # the same seed draws the same network: pnnh{d} is resnet{d}, weight for weight
    ref = he.state_dict()
    assert resnet.state_dict().keys() == ref.keys()
    assert all(torch.equal(v, ref[k]) for k, v in resnet.state_dict().items())
    torch.manual_seed(1)
    other = create_model(f"pnnh{depth}", in_shape=(1, 28, 28), width=4)
    assert not torch.equal(other.blocks[0].enc.weight, pnnh.blocks[0].enc.weight)
    assert all(torch.all(b.bn2.weight == 1) for b in resnet.blocks)  # the standard ResNet's
    create_model(f"pnnh{depth}", in_shape=(1, 28, 28), width=4).load_state_dict(
        resnet_to_pnnh(he).state_dict(), strict=True)
    x = torch.randn(8, 1, 28, 28)
    for mode in (True, False):
        with torch.no_grad():
            assert torch.allclose(pnnh.train(mode)(x), resnet.train(mode)(x), atol=1e-5)
    # SGD as `pnnh train` runs it, in float64 so that the comparison is about the maths: the
    # two run the same operations on the same values (rounding ~1e-16 per operation, grown by
    # at most a few orders over 5 steps), while a different start is ~1e-1 away
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(16, 1, 28, 28, generator=g, dtype=torch.float64) for _ in range(2)]
    ys = [torch.randint(0, 10, (16,), generator=g) for _ in range(2)]
    he64 = he.double()
    twin.train()
    assert torch.allclose(_sgd_steps(twin, xs, ys, 5), _sgd_steps(he64.train(), xs, ys, 5),
                          rtol=1e-10, atol=0)
    for mode in (True, False):
        with torch.no_grad():
            a, b = twin.train(mode)(xs[0]), he64.train(mode)(xs[0])
            assert torch.allclose(a, b, rtol=0, atol=1e-10 * float(b.abs().max()))
            assert not torch.allclose(a, other.double().train(mode)(xs[0]), atol=1e-3)
    # Blocks built by PNNHBlock itself (options other than the ResNet's) draw He init (fan_out)
    # too: the transition's E (16 -> 32 channels, 3x3) has std √(2 / (32·9)), not the fan_in
    # √(2 / (16·9)); its 4,608 entries estimate the std within ~1% (4 standard errors: 4.2%).
    # A learned S (32 x 16) has std √(2 / 32), not √(2 / 16): 512 entries, ~3% per standard error
    t = next(b for b in create_model(f"pnnh{depth}", in_shape=(1, 28, 28),
                                     transition_coder="orthogonal").blocks if b.transition)
    assert abs(float(t.enc.weight.detach().std()) / (2 / (32 * 9)) ** 0.5 - 1) < 0.042
    t = next(b for b in create_model(f"pnnh{depth}", in_shape=(1, 28, 28),
                                     learner_ratio=0.5).blocks if b.transition)
    assert isinstance(t.coder, ProjectionCoder)
    assert abs(float(t.coder.weight.detach().std()) / (2 / 32) ** 0.5 - 1) < 0.13
    # the learner contributes at init (a zero-init block would pass its input only)
    zero = create_model(f"pnnh{depth}", in_shape=(1, 28, 28), width=4, zero_init_decoder=True)
    zero.load_state_dict({k: v for k, v in pnnh.float().state_dict().items()
                          if "bn2.weight" not in k}, strict=False)
    with torch.no_grad():
        assert not torch.allclose(zero.eval()(x), pnnh.float().eval()(x), atol=1e-3)
    mlp = create_model("pnnh_mlp", depth=8, width=16)
    assert all(torch.all(b.dec.weight == 0) for b in mlp.blocks)
