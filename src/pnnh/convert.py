"""Turn a (trained) ResNet into an exactly equivalent plain network: the internal-path construction.

A post-activation residual block ``y = relu(F₂ relu(F₁ x) + S x)`` (``F`` = Linear/Conv with
BatchNorm folded, ``S`` the shortcut) becomes two plain layers by widening the hidden layer
with units that carry the shortcut across the ReLU:

- identity shortcut: the block input is the output of a ReLU, so ``x >= 0`` and
  ``relu(x) = x``; the hidden layer gets ``n`` extra units with weights ``I`` and the second
  layer reads them with ``I``::

      y = relu( [F₂, I] · relu([F₁; I] x + [b₁; 0]) + b₂ )

- projection shortcut ``S x + s`` (1x1 stride-2 conv + BN): ``S x`` may be negative, so it
  crosses the ReLU as a PNNH coder pair ``relu(z) - relu(-z) = z``::

      y = relu( [F₂, I, -I] · relu([F₁; S; -S] x + [b₁; s; -s]) + b₂ )

  (the 1x1 kernel sits at the centre tap of the 3x3, stride-2, padding-1 kernel: the same
  input pixel ``2i``).

The output equals the ResNet's in eval mode (BatchNorm statistics folded) up to float error;
the price is the wider hidden layer (``n`` or ``2n`` extra units per block), reported by
:func:`conversion_report`. When a block's input is not known to be non-negative (a stem
that does not end in a ReLU), identity shortcuts use the ``[I; -I]`` pair too.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from pnnh.coder import fold_bn
from pnnh.convert_blocks import Stream, build_block, read_block
from pnnh.convert_layouts import plain_cost, resnet_to_plain
from pnnh.errors import PnnhError
from pnnh.models import count_parameters

__all__ = ["FixedProjection", "conversion_report", "convert_block", "plain_cost",
           "pnnh_block_to_residual", "pnnh_to_resnet", "resnet_to_plain", "resnet_to_pnnh",
           "residual_block_to_pnnh"]


def _layer_like(like: nn.Module, w: torch.Tensor, b: torch.Tensor | None) -> nn.Module:
    """A new layer of ``like``'s type and geometry holding weight ``w`` (its shape gives the
    channels) and bias ``b`` (None: no bias)."""
    cout, cin = w.shape[0], w.shape[1]
    if isinstance(like, nn.Linear):
        out = nn.Linear(cin, cout, bias=b is not None)
    else:
        out = type(like)(cin, cout, like.kernel_size, like.stride, like.padding, bias=b is not None)
    out = out.to(w)
    with torch.no_grad():
        out.weight.copy_(w)
        if b is not None:
            out.bias.copy_(b)
    return out


def _parts(block: nn.Module):
    """``(layer1, (w1, b1), layer2, (w2, b2), shortcut)`` with BatchNorm folded.

    ``shortcut`` is None (identity) or ``(w_s, b_s)`` embedded in layer 1's kernel geometry.
    """
    l1 = getattr(block, "conv1", None) or getattr(block, "fc1", None)
    l2 = getattr(block, "conv2", None) or getattr(block, "fc2", None)
    if l1 is None or l2 is None:
        raise PnnhError(f"cannot convert block {type(block).__name__}: expected conv1/conv2 or "
                        "fc1/fc2", field="model")
    w1 = fold_bn(l1.weight, l1.bias, getattr(block, "bn1", nn.Identity()))
    w2 = fold_bn(l2.weight, l2.bias, getattr(block, "bn2", nn.Identity()))
    sc = getattr(block, "shortcut", None) or getattr(block, "downsample", None) or nn.Identity()
    if isinstance(sc, nn.Identity):
        return l1, w1, l2, w2, None
    if isinstance(sc, FixedProjection):  # a PNNH transition's P x, as pnnh_to_resnet writes it
        if l1.kernel_size != (3, 3) or l1.padding != (1, 1) or l1.stride != (2, 2):
            raise PnnhError("a 2x2 stride-2 projection shortcut needs a 3x3 stride-2 conv1",
                            field="model")
        p, bs = fold_bn(sc.conv.weight, None, sc.norm)
        ws = p.new_zeros(*p.shape[:2], 3, 3)
        ws[:, :, 1:, 1:] = p  # inputs 2i, 2i+1: taps 1 and 2 of a 3x3 stride-2 padding-1 conv
        return l1, w1, l2, w2, (ws, bs)
    conv, bn = sc[0], sc[1] if len(sc) > 1 else nn.Identity()
    ws, bs = fold_bn(conv.weight, conv.bias, bn)
    if (ws.shape[2:] != (1, 1) or l1.kernel_size != (3, 3) or l1.padding != (1, 1)
            or conv.stride != l1.stride):
        raise PnnhError("only 1x1 projection shortcuts beside 3x3 convs of the same stride are "
                        "supported", field="model")
    return l1, w1, l2, w2, (F.pad(ws, (1, 1, 1, 1)), bs)


@torch.no_grad()
def convert_block(block: nn.Module, nonneg_input: bool = True) -> list[nn.Module]:
    """Plain layers equal to one post-activation residual block (input ``x >= 0`` when
    ``nonneg_input``, else signed): see :mod:`pnnh.convert_blocks`."""
    spec = read_block("block", block)
    return build_block(spec, Stream(spec.branch[0].w.shape[1], "x" if nonneg_input else "raw"),
                       None)


@torch.no_grad()
def conversion_report(model: nn.Module, plain: nn.Sequential | None = None,
                      example: torch.Tensor | None = None) -> dict:
    """Parameters before/after and the largest output difference on ``example`` (or random)."""
    plain = resnet_to_plain(model) if plain is None else plain
    if example is None:
        example = torch.randn(4, *model.in_shape)
    was = model.training
    model.eval()
    err = float((plain(example) - model(example)).abs().max())
    model.train(was)
    p0, p1 = count_parameters(model), count_parameters(plain)
    return {"params_resnet": p0, "params_plain": p1, "param_ratio": p1 / p0,
            "max_abs_diff": err}


# =========================================================================== PNNH <-> ResNet
#
# The equivalence (docs/PNNH.md, "The equivalence"). With r = 1 and AᵀA = I the coder path of a
# PNNH block is Aᵀ relu(Ax) - Aᵀ relu(-Ax) = AᵀA x = x, so
#
#     PNNH block   relu( AᵀA x + bn2(D relu(bn1(E x + b1))) + b2 )
#   = ResNet block relu( x     + bn2(D relu(bn1(E x + b1))) + b2 )   (post-activation, branch E, D)
#
# for every orthogonal A. A transition's coder path P x (2x2 stride-2 kernel, P Pᵀ = I) is a
# projection shortcut: it is not inert, and maps to a shortcut conv computing P x.


def _coder_is_identity(coder: nn.Module, atol: float = 1e-4) -> bool:
    """``AᵀA = I`` (square pointwise coder, within ``atol``): the coder path is ``x``."""
    from pnnh.coder import Coder

    if not isinstance(coder, Coder) or coder.kernel_size != 1 or coder.width != coder.dim:
        return False
    a = coder.matrix.detach().double()
    return float((a.t() @ a - torch.eye(coder.dim, dtype=a.dtype)).abs().max()) <= atol


class FixedProjection(nn.Module):
    """The shortcut ``P x`` of a PNNH transition: zero-pad (0, 1, 0, 1), 2x2 stride-2 conv, and
    the transition's BatchNorm ``norm`` where it has one (``bn_c(P x)``, as a ResNet's
    projection shortcut normalises).

    ``P`` (``C' x C x 2 x 2``) is copied from the coder; it trains only if the coder's did.
    """

    def __init__(self, weight: torch.Tensor, trainable: bool = False,
                 norm: nn.Module | None = None):
        super().__init__()
        self.pad = nn.ZeroPad2d((0, 1, 0, 1))
        self.conv = nn.Conv2d(weight.shape[1], weight.shape[0], 2, stride=2, bias=False)
        self.conv = self.conv.to(weight)
        with torch.no_grad():
            self.conv.weight.copy_(weight)
        self.conv.weight.requires_grad_(trainable)
        self.norm = copy.deepcopy(norm) if norm is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(self.pad(x)))


def _transition_weight(coder: nn.Module) -> torch.Tensor:
    """``P`` as a ``(C', C, 2, 2)`` kernel, zero rows where the coder is narrower than ``C'``."""
    p = coder.kernel().detach()
    if coder.width < coder.out_channels:
        p = torch.cat([p, p.new_zeros(coder.out_channels - coder.width, *p.shape[1:])])
    return p


@torch.no_grad()
def pnnh_block_to_residual(block: nn.Module) -> nn.Module:
    """The post-activation residual block computing ``block``'s function (train and eval).

    Learner ``E, D`` (and BatchNorm) become the branch, ``b2`` the second layer's bias, the
    coder the shortcut: identity (``AᵀA = I``) or, at a transition, the ResNet's own
    ``Sequential(Conv2d(1x1, stride 2), BatchNorm2d)`` for a learned projection ``S``
    (:class:`pnnh.coder.ProjectionCoder`, the BatchNorm CNN default) or a
    :class:`FixedProjection` for a co-isometry ``P``.
    """
    from pnnh.coder import ProjectionCoder
    from pnnh.models.cifar import BasicBlock
    from pnnh.models.cnn1d import ResidualBlock1d
    from pnnh.models.mlp import ResidualMLPBlock

    if block.learner_width == 0:
        raise PnnhError("cannot convert a PNNH block without a learner", field="model")
    n_in, n_out = block.coder.in_dim, block.coder.out_dim
    if block.dims == 2:
        res = BasicBlock(n_in, n_out, block.stride)
    elif block.dims == 1:
        res = ResidualBlock1d(n_in, block.kernel_size)
    else:
        res = ResidualMLPBlock(n_in)
    res = res.to(block.enc.weight)  # dtype and device of the block, BatchNorm buffers included
    if block.transition and isinstance(block.coder, ProjectionCoder):
        res.shortcut[0].weight.copy_(block.coder.kernel())
        if block.carry_bn is not None:
            res.shortcut[1].load_state_dict(block.carry_bn.state_dict())
        else:
            res.shortcut = res.shortcut[:1]
    elif block.transition:
        res.shortcut = FixedProjection(_transition_weight(block.coder),
                                       trainable=not block.coder.fixed, norm=block.carry_bn)
    elif not _coder_is_identity(block.coder):
        raise PnnhError("cannot convert a PNNH block whose coder is not orthogonal and square "
                        "(AᵀA != I: coder_ratio < 1, a k x k coder or a drifted coder change "
                        "the function)", field="model")
    l1, l2 = (res.conv1, res.conv2) if block.dims else (res.fc1, res.fc2)
    l1 = _layer_like(l1, block.enc.weight.detach(), block.enc.bias)
    l2 = _layer_like(l2, block.dec.weight.detach(), block.bias)
    if block.dims:
        res.conv1, res.conv2 = l1, l2
    else:
        res.fc1, res.fc2 = l1, l2
    if block.dims == 2:
        res.bn1.load_state_dict(block.bn1.state_dict())
        res.bn2.load_state_dict(block.bn2.state_dict())
    _copy_drop_path(block, res)
    return res.train(block.training)


def _copy_drop_path(src: nn.Module, dst: nn.Module) -> None:
    """Carry stochastic depth across a conversion: every converted block type has it, and the
    same rate gives the same per-sample draws in training (a block from elsewhere has none)."""
    dst.drop_path = float(getattr(src, "drop_path", 0.0))


@torch.no_grad()
def residual_block_to_pnnh(block: nn.Module) -> nn.Module:
    """The PNNH block computing a post-activation residual ``block``'s function.

    Identity shortcut: a fixed identity coder (exact in train and eval mode). Projection
    shortcut ``bn_s(S x)`` (1x1 stride-2 conv, BatchNorm or none): a learned transition coder
    :class:`pnnh.coder.ProjectionCoder` holding ``S``, with ``bn_s`` as the block's
    ``carry_bn`` — the same parameters, exact in train mode too. A
    :class:`FixedProjection` (what :func:`pnnh_block_to_residual` makes of a transition)
    comes back as the coder it was, trainable only if it was, with its BatchNorm as the
    block's ``carry_bn`` (exact in train mode too).
    """
    from pnnh.coder import PNNHBlock, freeze_coder_

    l1, (w1, b1), l2, (w2, b2), sc = _parts(block)
    learned = _learned_projection(block)
    dims = 0 if isinstance(l1, nn.Linear) else l1.weight.dim() - 2
    n_in, hidden, n_out = w1.shape[1], w1.shape[0], w2.shape[0]
    bn = isinstance(getattr(block, "bn1", None), nn.modules.batchnorm._BatchNorm)
    stride = 1 if dims == 0 else l1.stride[0]
    shortcut = getattr(block, "shortcut", None)
    carry_norm = getattr(shortcut, "norm", None) if isinstance(shortcut, FixedProjection) else None
    carry_norm = carry_norm if isinstance(carry_norm, nn.modules.batchnorm._BatchNorm) else None
    if learned is not None:
        carry_norm = learned[1]
    out = PNNHBlock(n_in, hidden, dims=dims, out_dim=n_out, stride=stride,
                    kernel_size=3 if dims == 0 else l1.kernel_size[0], batchnorm=bn,
                    zero_init_decoder=False, transition_norm=carry_norm is not None,
                    transition_coder="orthogonal" if learned is None else "projection").to(w1)
    out.enc.weight.copy_(l1.weight)
    if out.enc.bias is not None:
        out.enc.bias.copy_(l1.bias)
    out.dec.weight.copy_(l2.weight)
    if bn:
        out.bn1.load_state_dict(block.bn1.state_dict())
        out.bn2.load_state_dict(block.bn2.state_dict())
    else:
        out.bias.copy_(l2.bias if l2.bias is not None else torch.zeros_like(out.bias))
    if sc is None:
        freeze_coder_(out.coder)
    elif learned is not None:  # S and its BatchNorm as they were
        out.coder.weight.copy_(learned[0].weight)
        if carry_norm is not None:
            out.carry_bn.load_state_dict(carry_norm.state_dict())
    else:
        ws, bs = sc  # folded, embedded in a 3x3 kernel: a 1x1 at tap (1, 1), a 2x2 at [1:, 1:]
        p = ws[:, :, 1:, 1:].to(out.coder.weight)  # the 2x2 coder reads inputs 2i, 2i+1
        if carry_norm is not None:  # P and its BatchNorm as they were: exact in train mode too
            p = shortcut.conv.weight.detach().to(out.coder.weight)
            out.carry_bn.load_state_dict(carry_norm.state_dict())
        else:
            out.bn2.bias.add_(bs)
        out.coder.width = n_out
        trainable = (not isinstance(shortcut, FixedProjection)
                     or shortcut.conv.weight.requires_grad)
        out.coder.weight = nn.Parameter(p.reshape(n_out, 4 * n_in), requires_grad=trainable)
    _copy_drop_path(block, out)
    return out.train(block.training)


def _learned_projection(block: nn.Module) -> tuple[nn.Conv2d, nn.Module | None] | None:
    """``(conv, bn or None)`` of a ``Sequential(Conv2d(1x1, stride 2, no bias)[, BatchNorm2d])``
    shortcut beside a 3x3 stride-2 padding-1 ``conv1`` (torchvision's and the registry's
    option B), which a :class:`pnnh.coder.ProjectionCoder` holds as it is; else None."""
    sc = getattr(block, "shortcut", None) or getattr(block, "downsample", None)
    l1 = getattr(block, "conv1", None)
    if not isinstance(sc, nn.Sequential) or not isinstance(l1, nn.Conv2d) or not 1 <= len(sc) <= 2:
        return None
    conv, bn = sc[0], sc[1] if len(sc) > 1 else None
    if not (isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.bias is None
            and conv.stride == (2, 2) and conv.padding == (0, 0) and conv.groups == 1
            and l1.kernel_size == (3, 3) and l1.stride == (2, 2) and l1.padding == (1, 1)):
        return None
    if bn is not None and type(bn) is not nn.BatchNorm2d:
        return None
    return conv, bn


def _swap_blocks(model: nn.Module, convert) -> nn.Module:
    if not all(hasattr(model, a) for a in ("stem", "blocks", "head")):
        raise PnnhError(f"cannot convert {type(model).__name__}: expected stem/blocks/head",
                        field="model")
    out = copy.deepcopy(model)
    out.blocks = nn.Sequential(*[convert(b) for b in model.blocks])
    if "coder_constraint" in out._modules:
        del out._modules["coder_constraint"]
    return out.train(model.training)


def pnnh_to_resnet(model: nn.Module) -> nn.Module:
    """The ResNet computing a PNNH model's function: same stem, head and learner weights.

    Each block goes through :func:`pnnh_block_to_residual`; the result has the registry
    ResNet's modules (``resnet_mlp``, ``resnet_cnn1d``, ``resnet20/56/110``, ``resnet18``)
    except that a transition's shortcut is the PNNH's ``P`` (:class:`FixedProjection`).
    """
    return _swap_blocks(model, pnnh_block_to_residual)


def resnet_to_pnnh(model: nn.Module) -> nn.Module:
    """The PNNH model computing a post-activation ResNet's function (see
    :func:`residual_block_to_pnnh`: exact in train mode without projection shortcuts)."""
    return _swap_blocks(model, residual_block_to_pnnh)
