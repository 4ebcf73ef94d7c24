"""Whole ResNets -> one plain chain: the layouts people use, stems, heads and costs.

Layouts (:func:`resnet_layout`): pnnh's (``stem``, ``blocks``, ``head``); torchvision's
(``conv1/bn1/relu/maxpool``, ``layer1..N``, ``avgpool/fc``: BasicBlock, Bottleneck, ResNeXt,
Wide ResNet); timm's ResNet (``conv1/bn1/act1/maxpool`` — ``conv1`` may be a deep stem —,
``layer1..N``, ``global_pool/fc``); timm's ResNetV2 (``stem``, ``stages.*.blocks``, ``norm``,
``head``: pre-activation blocks). Every block is read first (:func:`read_block`: anything
without an exact plain form is refused by name before anything is built), then written by
:func:`build_block` and checked against the original on a seeded probe.

Pre-activation nets carry the signed block output ``z`` as ``relu(z), relu(−z)``; the last
layer of each block also writes the next block's ``relu(norm1(z))``, so a pre-activation net
becomes one layer per convolution (plus one 1x1 layer after a stem that ends in a max-pool:
``relu(−maxpool(c))`` is a min-pool, so the stem's pooled output ``z₀`` is read by a 1x1 conv
``[diag γ; I; −I]`` before its ReLU). After the last block: the final ``norm`` + ReLU folds in
(ResNetV2), or, without one, the head's first affine layer reads ``[W, −W]`` from the pair
(average pooling and flattening are linear and pass the pair through).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from pnnh.convert_blocks import Affine as _Affine
from pnnh.convert_blocks import (
    BlockSpec,
    Stream,
    build_block,
    input_heads,
    norm_affine,
    read_block,
    regroup,
    signed_heads,
    verify_block,
)
from pnnh.errors import ConfigError
from pnnh.export import plain_layers

_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d,
          nn.AdaptiveAvgPool2d)


def _stages(model: nn.Module, pattern: str, key) -> list[tuple[str, nn.Module]]:
    names = sorted((n for n, _ in model.named_children() if re.fullmatch(pattern, n)), key=key)
    return [(f"{n}.{j}", b) for n in names for j, b in getattr(model, n).named_children()]


def resnet_layout(model: nn.Module):
    """``(stem modules, [(name, block)], tail modules, final norm or None)``, or a
    :class:`ConfigError` naming the layouts understood."""
    if all(hasattr(model, a) for a in ("stem", "blocks", "head")):
        return [model.stem], [(f"blocks.{i}", b) for i, b in enumerate(model.blocks)], \
            [model.head], None
    if hasattr(model, "stem") and hasattr(model, "stages") and hasattr(model, "head"):
        blocks = [(f"stages.{i}.blocks.{j}", b) for i, s in enumerate(model.stages)
                  for j, b in enumerate(getattr(s, "blocks", s))]
        return [model.stem], blocks, [model.head], getattr(model, "norm", None)
    layer = r"layer\d+"
    key = lambda n: int(n[5:])  # noqa: E731
    if all(hasattr(model, a) for a in ("conv1", "bn1", "maxpool", "layer1", "fc")):
        act = getattr(model, "relu", None) or getattr(model, "act1", None)
        pool = getattr(model, "avgpool", None) or getattr(model, "global_pool", None)
        if act is not None and pool is not None:
            stem = [model.conv1, model.bn1, act, model.maxpool]
            tail = [pool] + ([nn.Flatten(1)] if hasattr(model, "avgpool") else []) + [model.fc]
            return stem, _stages(model, layer, key), tail, None
    raise ConfigError(f"cannot convert {type(model).__name__}: expected stem/blocks/head (pnnh), "
                      "conv1/bn1/relu/maxpool, layer1.., avgpool/fc (torchvision), "
                      "conv1/bn1/act1/maxpool, layer1.., global_pool/fc (timm ResNet) or "
                      "stem, stages, norm, head (timm ResNetV2)", field="model")


def _basic(modules) -> list[nn.Module]:
    """timm's composite modules as the basic ones :func:`plain_layers` folds: BatchNormAct2d ->
    BatchNorm + its activation, SelectAdaptivePool2d / ClassifierHead -> their parts; dropout
    and identities vanish (eval mode)."""
    out: list[nn.Module] = []
    for m in modules:
        kind = type(m).__name__
        if isinstance(m, (nn.Dropout, nn.Identity)) or m is None:
            continue
        if isinstance(m, nn.Sequential):
            out += _basic(m)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm) and hasattr(m, "act"):
            out += [m] + _basic([m.act])
        elif kind == "SelectAdaptivePool2d":
            out += _basic([m.pool, m.flatten])
        elif kind in ("FastAdaptiveAvgPool",):
            out += [nn.AdaptiveAvgPool2d(1)] + ([nn.Flatten(1)] if m.flatten else [])
        elif kind == "ClassifierHead":
            out += _basic([m.global_pool, m.fc, m.flatten])
        elif type(m) in (nn.ReLU,) or isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Flatten,
                                                     nn.modules.batchnorm._BatchNorm, *_POOLS)):
            if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)) and type(m) not in (
                    nn.Linear, nn.Conv1d, nn.Conv2d):
                raise ConfigError(f"cannot convert layer {kind}: a subclass of "
                                  f"{type(m).__mro__[1].__name__} with its own forward",
                                  field="model")
            out.append(m)
        elif hasattr(m, "to_plain_layers"):
            out.append(m)
        else:
            raise ConfigError(f"cannot convert {kind} in the stem or head: only Conv/Linear, "
                              "BatchNorm, ReLU, average/max pooling and Flatten have a plain "
                              "form here", field="model")
    return out


def _nonneg(layers: list[nn.Module]) -> bool:
    """The chain's output is a ReLU output (possibly pooled)."""
    for m in reversed(layers):
        if isinstance(m, nn.ReLU):
            return True
        if not isinstance(m, (*_POOLS, nn.Flatten)):
            return False
    return False


def _heads_layer(layers: list[nn.Module], heads: list, like: _Affine) -> list[nn.Module]:
    """``layers`` followed by ``relu(γ z + β)`` for each head: folded into a last affine layer,
    or as a new 1x1 layer (after a pooling layer)."""
    last = layers[-1] if layers else None
    if isinstance(last, nn.Linear) or (isinstance(last, (nn.Conv1d, nn.Conv2d))
                                       and last.groups == 1):
        w, b = last.weight.detach(), last.bias.detach()
        shape = (-1,) + (1,) * (w.dim() - 1)
        hw = torch.cat([g.reshape(shape) * w for g, _ in heads])
        hb = torch.cat([g * b + be for g, be in heads])
        geo = _Affine(w, b, type(last), tuple(getattr(last, "stride", ())),
                      tuple(getattr(last, "padding", ())), tuple(getattr(last, "dilation", ())))
        return layers[:-1] + [regroup(type(last), hw, hb, geo), nn.ReLU()]
    c = heads[0][0].numel()
    d = like.w.dim() - 2
    hw = torch.cat([torch.diag(g) for g, _ in heads]).reshape(len(heads) * c, c, *(1,) * d)
    hb = torch.cat([be for _, be in heads])
    geo = _Affine(hw, hb, like.kind, (1,) * d, (0,) * d, (1,) * d)
    if like.kind is nn.Linear:
        hw = hw.reshape(len(heads) * c, c)
    return layers + [regroup(like.kind, hw, hb, geo), nn.ReLU()]


def _signed_tail(layers: list[nn.Module], model: nn.Module) -> list[nn.Module]:
    """The head after a signed pair ``relu(z), relu(−z)``: linear pooling/flattening pass the
    pair through, and the first affine layer reads ``[W, −W]``."""
    for i, m in enumerate(layers):
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            w = m.weight.detach()
            new = regroup(type(m), torch.cat([w, -w], dim=1), m.bias.detach(), _Affine(
                w, m.bias.detach(), type(m), tuple(getattr(m, "stride", ())),
                tuple(getattr(m, "padding", ())), tuple(getattr(m, "dilation", ()))))
            return layers[:i] + [new] + layers[i + 1:]
        if not isinstance(m, (nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d,
                              nn.AdaptiveAvgPool2d, nn.Flatten)):
            break
    raise ConfigError(f"cannot convert {type(model).__name__}: its last pre-activation block's "
                      "signed output meets a non-linear head (only average pooling, flattening "
                      "and a Linear/Conv layer read a signed carrier exactly)", field="model")


def _final_heads(norm: nn.Module | None, c: int, like: torch.Tensor) -> tuple[list, bool]:
    """The heads the last pre-activation block writes, and whether the tail reads a pair."""
    if norm is None or isinstance(norm, nn.Identity):
        return signed_heads(c, like), True
    g, b = norm_affine("norm", norm, norm)
    act = getattr(norm, "act", nn.Identity())
    if type(act) is nn.ReLU:
        return [(g, b)], False
    if isinstance(act, nn.Identity):
        return [(g, b), (-g, -b)], True
    raise ConfigError(f"cannot convert the final norm's activation {type(act).__name__}: only "
                      "ReLU has an exact carrier", field="model")


def _which_input(spec: BlockSpec) -> BlockSpec:
    """A pre-activation block's shortcut reads ``relu(norm1(z))`` (timm ResNetV2) or ``z``
    (the original pre-activation ResNet): the one whose plain form matches the block."""
    if spec.preact is None or spec.shortcut is None:
        return spec
    c_out = spec.branch[-1].w.shape[0]
    for reads in (True, False):
        spec.reads_preact = reads
        stream = Stream(spec.branch[0].w.shape[1], input_heads(spec))
        out = signed_heads(c_out, spec.branch[-1].w)
        try:
            verify_block(spec, stream, Stream(c_out, out), build_block(spec, stream, out))
            return spec
        except ConfigError:
            continue
    return spec  # the full check names the block


def _read_all(blocks) -> list:
    """Every block read (and refused) before anything is built: a spec, or a plain block."""
    specs = []
    for name, block in blocks:
        if hasattr(block, "to_plain_layers"):
            specs.append(block)
        else:
            specs.append(_which_input(read_block(name, block)))
    kinds = {s.preact is not None for s in specs if isinstance(s, BlockSpec)}
    if len(kinds) > 1:
        raise ConfigError("cannot convert a network that mixes pre- and post-activation blocks",
                          field="model")
    return specs


@torch.no_grad()
def resnet_to_plain(model: nn.Module, verify: bool = True) -> nn.Sequential:
    """An ``nn.Sequential`` of Conv/Linear/ReLU/pooling layers computing the ResNet's eval-mode
    function exactly (layouts: :func:`resnet_layout`; construction: :mod:`pnnh.convert_blocks`).

    Blocks that are already plain (``to_plain_layers``) pass through unchanged. Each converted
    block is checked against the original on a seeded probe (``verify``).
    """
    stem, blocks, tail, final_norm = resnet_layout(model)
    specs = _read_all(blocks)
    residual = [s for s in specs if isinstance(s, BlockSpec)]
    layers = plain_layers(_basic(stem))
    first = residual[0] if residual else None
    stream = Stream(first.branch[0].w.shape[1] if first else 0,
                    "x" if _nonneg(layers) else "raw")
    preact = first is not None and first.preact is not None
    if preact:
        heads = input_heads(first)
        layers = _heads_layer(layers, heads, first.branch[0])
        stream = Stream(stream.channels, heads)
    signed_out = False
    for i, spec in enumerate(specs):
        if not isinstance(spec, BlockSpec):
            layers += plain_layers([spec])
            continue
        c_out = spec.branch[-1].w.shape[0]
        out_heads = None
        if preact:
            nxt = next((s for s in specs[i + 1:] if isinstance(s, BlockSpec)), None)
            if nxt is not None:
                out_heads = input_heads(nxt)
            else:
                out_heads, signed_out = _final_heads(final_norm, c_out, spec.branch[-1].w)
        built = build_block(spec, stream, out_heads)
        out_stream = Stream(c_out, out_heads if out_heads is not None else "x")
        if verify:
            verify_block(spec, stream, out_stream, built)
        layers += built
        stream = out_stream
    tail_layers = plain_layers(_basic(tail))
    layers += _signed_tail(tail_layers, model) if signed_out else tail_layers
    return nn.Sequential(*layers).eval()


# --------------------------------------------------------------------------- cost


@torch.no_grad()
def plain_cost(model: nn.Module, example: torch.Tensor) -> dict:
    """Parameters (dense tensor sizes, and nonzeros) and multiply-accumulates of the Conv and
    Linear layers on one sample of ``example``'s shape (a grouped conv counts its own weights:
    ``out·in/groups·k`` per output pixel); BatchNorm, pooling and activations are not counted."""
    macs = 0

    def hook(m, _, out):
        nonlocal macs
        per_out = m.weight[0].numel()  # in/groups · k
        macs += per_out * out[0].numel()

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))]
    was = model.training
    model.eval()
    try:
        model(example[:1])
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    params = sum(p.numel() for p in model.parameters())
    nonzero = sum(int((p != 0).sum()) for p in model.parameters())
    return {"params": params, "nonzero_params": nonzero, "macs": macs}
