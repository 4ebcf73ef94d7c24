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

import torch
import torch.nn.functional as F
from torch import nn

from pnnh.coder import fold_bn
from pnnh.errors import PnnhError
from pnnh.export import plain_layers
from pnnh.registry import count_parameters


def _layer_like(proto: nn.Module, cin: int, cout: int, w: torch.Tensor, b: torch.Tensor):
    if isinstance(proto, nn.Linear):
        out = nn.Linear(cin, cout)
    else:
        out = type(proto)(cin, cout, proto.kernel_size, proto.stride, proto.padding)
    out = out.to(w)
    with torch.no_grad():
        out.weight.copy_(w)
        out.bias.copy_(b)
    return out


def _eye_like(w: torch.Tensor, n: int) -> torch.Tensor:
    """The identity map ``n -> n`` in the layout of ``w`` (a centred Dirac kernel for convs)."""
    eye = torch.eye(n, dtype=w.dtype, device=w.device)
    if w.dim() == 2:
        return eye
    k = w.shape[2:]
    e = eye.reshape(n, n, *([1] * len(k)))
    pads = []
    for s in reversed(k):
        pads += [(s - 1) // 2, s // 2]
    return F.pad(e, pads)


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
    sc = getattr(block, "shortcut", nn.Identity())
    if isinstance(sc, nn.Identity):
        return l1, w1, l2, w2, None
    conv, bn = sc[0], sc[1] if len(sc) > 1 else nn.Identity()
    ws, bs = fold_bn(conv.weight, conv.bias, bn)
    if ws.shape[2:] != (1, 1) or l1.kernel_size != (3, 3) or l1.padding != (1, 1):
        raise PnnhError("only 1x1 projection shortcuts beside 3x3 convs are supported",
                        field="model")
    return l1, w1, l2, w2, (F.pad(ws, (1, 1, 1, 1)), bs)


def _is_residual(block: nn.Module) -> bool:
    return hasattr(block, "shortcut") or "Residual" in type(block).__name__


@torch.no_grad()
def convert_block(block: nn.Module, nonneg_input: bool = True) -> list[nn.Module]:
    """Plain layers ``[layer1, ReLU, layer2, ReLU]`` equal to one post-activation residual block."""
    l1, (w1, b1), l2, (w2, b2), sc = _parts(block)
    n_out, n_in = w2.shape[0], w1.shape[1]
    if sc is None and nonneg_input:
        e = _eye_like(w1, n_in)
        w1c, b1c = torch.cat([w1, e]), torch.cat([b1, b1.new_zeros(n_in)])
        w2c = torch.cat([w2, _eye_like(w2, n_out)], dim=1)
    else:
        if sc is None:
            ws, bs = _eye_like(w1, n_in), b1.new_zeros(n_in)
        else:
            ws, bs = sc
        e = _eye_like(w2, n_out)
        w1c, b1c = torch.cat([w1, ws, -ws]), torch.cat([b1, bs, -bs])
        w2c = torch.cat([w2, e, -e], dim=1)
    hidden = w1c.shape[0]
    return [_layer_like(l1, n_in, hidden, w1c, b1c), nn.ReLU(),
            _layer_like(l2, hidden, n_out, w2c, b2), nn.ReLU()]


def _stem_nonneg(stem: nn.Module) -> bool:
    mods = [m for m in stem.modules() if not isinstance(m, nn.Sequential)] if isinstance(
        stem, nn.Sequential) else [stem]
    while mods and isinstance(mods[-1], (nn.MaxPool1d, nn.MaxPool2d)):
        mods.pop()
    return bool(mods) and isinstance(mods[-1], nn.ReLU)


@torch.no_grad()
def resnet_to_plain(model: nn.Module) -> nn.Sequential:
    """An ``nn.Sequential`` of plain layers computing the ResNet's eval-mode function exactly.

    Works for models with ``stem``, ``blocks`` and ``head`` whose residual blocks are
    post-activation (``relu(F(x) + S x)``): ``resnet_mlp``, ``resnet_cnn1d``, the CIFAR
    ResNets and ``resnet18``. Blocks that are already plain pass through unchanged.
    """
    if not all(hasattr(model, a) for a in ("stem", "blocks", "head")):
        raise PnnhError(f"cannot convert {type(model).__name__}: expected stem/blocks/head",
                        field="model")
    nonneg = _stem_nonneg(model.stem)
    layers = plain_layers([model.stem])
    for block in model.blocks:
        if _is_residual(block):
            layers += convert_block(block, nonneg)
        else:
            layers += plain_layers([block])
    layers += plain_layers([model.head])
    return nn.Sequential(*layers).eval()


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
