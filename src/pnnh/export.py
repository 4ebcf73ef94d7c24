"""Export a plain or PNNH model to one straight chain of layers: ``nn.Sequential``, ONNX.

:func:`to_plain` walks ``stem -> blocks -> head``: every block gives its plain layers
(``block.to_plain_layers()``: a PNNH block materializes ``[A; -A; E]`` and ``[Aᵀ, -Aᵀ, D]``),
BatchNorm is folded into the preceding layer with its running statistics, and the result is an
``nn.Sequential`` of Linear / Conv / ReLU / Flatten / pooling layers computing the model's
eval-mode function. A ResNet has no plain form block by block; turn it into one with
:func:`pnnh.convert.resnet_to_plain`.

Files: ``--format plain`` writes a weights-only file (layer specs + state dict, loadable
without executing code) read back by :func:`load_plain`; ``--format onnx`` writes ONNX.
"""

from __future__ import annotations

import copy
import io
import warnings
from pathlib import Path

import torch
from torch import nn

from pnnh.coder import fold_bn
from pnnh.errors import CheckpointError, PnnhError
from pnnh.io import atomic_write_bytes, content_digest, verify_digest

PLAIN_FORMAT = "pnnh-plain"
_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)
_PASS = (nn.ReLU, nn.Flatten, nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d,
         nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)
_BN = nn.modules.batchnorm._BatchNorm


def _with_bias(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> nn.Module:
    """A copy of ``layer`` (Linear/Conv) with the given weight and a bias."""
    if isinstance(layer, nn.Linear):
        out = nn.Linear(layer.in_features, layer.out_features)
    else:
        out = type(layer)(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                          layer.padding, layer.dilation, layer.groups, bias=True)
    out = out.to(weight)
    with torch.no_grad():
        out.weight.copy_(weight)
        out.bias.copy_(bias)
    return out


def plain_layers(modules) -> list[nn.Module]:
    """Flatten ``modules`` into plain layers, folding each BatchNorm into the layer before it."""
    out: list[nn.Module] = []
    for m in modules:
        if isinstance(m, nn.Sequential):
            out.extend(plain_layers(m))
        elif hasattr(m, "to_plain_layers"):
            out.extend(plain_layers(m.to_plain_layers()))
        elif isinstance(m, _BN):
            prev = out[-1] if out else None
            if not isinstance(prev, _LAYERS):
                raise PnnhError(f"cannot fold {type(m).__name__}: it does not follow a "
                                "Linear/Conv layer", field="model")
            w, b = fold_bn(prev.weight, prev.bias, m)
            out[-1] = _with_bias(prev, w, b)
        elif isinstance(m, _LAYERS):
            w = m.weight.detach()
            b = m.bias.detach() if m.bias is not None else w.new_zeros(w.shape[0])
            out.append(_with_bias(m, w, b))
        elif isinstance(m, _PASS):
            out.append(copy.deepcopy(m))
        elif isinstance(m, nn.Identity):
            continue
        else:
            hint = ""
            if hasattr(m, "shortcut") or "Residual" in type(m).__name__ or "Basic" in type(m).__name__:
                hint = "; a ResNet converts with pnnh.convert.resnet_to_plain(model)"
            raise PnnhError(f"cannot export {type(m).__name__} as plain layers{hint}",
                            field="model")
    return out


_NONNEG_KEEP = (nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d,
                nn.AdaptiveAvgPool2d, nn.Flatten, nn.Identity)


def _drop_units(first: nn.Module, second: nn.Module, keep: torch.Tensor,
                merge: dict[int, list[int]]) -> tuple[nn.Module, nn.Module]:
    """``first`` without the output units not in ``keep``; ``second`` reading only those, with
    the columns of each merged duplicate ``k`` added to its kept twin ``j`` (``merge[j]``)."""
    w2 = second.weight.detach().clone()
    for j, dups in merge.items():
        for k in dups:
            w2[:, j] += w2[:, k]
    w1, b1 = first.weight.detach()[keep], first.bias.detach()[keep]
    n = int(keep.numel())
    new1 = _resized(first, first.weight.shape[1], n, w1, b1)
    new2 = _resized(second, n, second.weight.shape[0], w2[:, keep], second.bias.detach())
    return new1, new2


def _resized(layer: nn.Module, cin: int, cout: int, w: torch.Tensor, b: torch.Tensor):
    if isinstance(layer, nn.Linear):
        out = nn.Linear(cin, cout)
    else:
        out = type(layer)(cin, cout, layer.kernel_size, layer.stride, layer.padding,
                          layer.dilation, bias=True)
    out = out.to(w)
    with torch.no_grad():
        out.weight.copy_(w)
        out.bias.copy_(b)
    return out


def _prunable_units(layer: nn.Module, nonneg_input: bool) -> tuple[torch.Tensor, dict]:
    """Units of ``layer`` to keep, and the duplicates each kept unit absorbs.

    A unit is *dead* when its bias is ``<= 0`` and its incoming weights are all ``<= 0`` on a
    non-negative input (all ``0`` on a signed one): its pre-activation is ``<= 0`` for every
    input, so ``relu`` makes it 0. Two units
    with identical incoming weights and bias are *duplicates*: equal after ``relu`` too.
    """
    w = layer.weight.detach().reshape(layer.weight.shape[0], -1)
    b = layer.bias.detach()
    nonpos = (w <= 0).all(dim=1) if nonneg_input else (w == 0).all(dim=1)
    alive = ~(nonpos & (b <= 0))
    rows = torch.cat([w, b[:, None]], dim=1)
    merge: dict[int, list[int]] = {}
    seen: dict[bytes, int] = {}
    for j in torch.nonzero(alive).flatten().tolist():
        key = rows[j].cpu().numpy().tobytes()
        if key in seen:
            merge.setdefault(seen[key], []).append(j)
            alive[j] = False
        else:
            seen[key] = j
    return torch.nonzero(alive).flatten(), merge


def _pairable(m: nn.Module, act: nn.Module, nxt: nn.Module) -> bool:
    """``m, ReLU, nxt`` where ``nxt`` reads ``m``'s units as its inputs (no grouping)."""
    if not isinstance(act, nn.ReLU):
        return False
    if isinstance(m, nn.Linear):
        return isinstance(nxt, nn.Linear) and nxt.in_features == m.out_features
    if isinstance(m, (nn.Conv1d, nn.Conv2d)):
        return (type(nxt) is type(m) and m.groups == 1 and nxt.groups == 1
                and nxt.in_channels == m.out_channels)
    return False


@torch.no_grad()
def prune_plain(layers: list[nn.Module]) -> list[nn.Module]:
    """Drop provably dead units and merge exactly duplicated ones; the function is unchanged.

    Looks at every ``layer, ReLU, layer`` triple of Linear or same-dimension Conv layers (the
    second reads the first's units as its input channels) and tracks which tensors are
    non-negative (a ReLU's output, and pooling / flattening of one). For a PNNH block with
    ``A = I`` on a ReLU output this removes the ``-A`` half of the coder: ``relu(-x) = 0``.
    """
    out = list(layers)
    nonneg = False  # the network input may be signed
    for i in range(len(out)):
        m = out[i]
        if i + 2 < len(out) and _pairable(m, out[i + 1], out[i + 2]):
            keep, merge = _prunable_units(m, nonneg)
            if 0 < keep.numel() < m.weight.shape[0]:
                out[i], out[i + 2] = _drop_units(m, out[i + 2], keep, merge)
        if isinstance(m, nn.ReLU):
            nonneg = True
        elif not isinstance(m, _NONNEG_KEEP):
            nonneg = False
    return out


@torch.no_grad()
def to_plain(model: nn.Module, lean: bool = True) -> nn.Sequential:
    """The model's eval-mode function as an ``nn.Sequential`` of plain layers (weights copied).

    ``lean`` (default) removes units that are provably dead or duplicated
    (:func:`prune_plain`). ViTs (PNNH-ViT and the plain ViT) go through
    :func:`pnnh.models.vit.vit_to_plain`, whose sequence also holds attention and LayerNorm
    modules.
    """
    from pnnh.models.vit import ViT, vit_to_plain

    if isinstance(model, ViT):
        try:
            return vit_to_plain(model).eval()
        except ValueError as e:
            raise PnnhError(f"cannot export {type(model).__name__}: {e}", field="model") from None
    if isinstance(model, nn.Sequential):
        parts = list(model)
    elif all(hasattr(model, a) for a in ("stem", "blocks", "head")):
        parts = [model.stem, *model.blocks, model.head]
    else:
        raise PnnhError(f"cannot export {type(model).__name__}: expected stem/blocks/head or an "
                        "nn.Sequential", field="model")
    layers = plain_layers(parts)
    return nn.Sequential(*(prune_plain(layers) if lean else layers)).eval()


def export_onnx(model: nn.Module, path: str | Path, example: torch.Tensor,
                plain: nn.Sequential | None = None) -> Path:
    """Write the plain form of ``model`` (``plain`` when given, e.g. a converted ResNet's) as
    ONNX (batch dimension dynamic); returns the path. Conv biases stay inside ``Conv`` nodes and
    a Linear is one ``Gemm``, so a plain chain exports with no ``Add``/``Mul``/``Concat``."""
    plain = (to_plain(model) if plain is None else plain).cpu()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(plain, (example.cpu(),), buf, dynamo=False, input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "batch"},
                                                                 "logits": {0: "batch"}})
    return atomic_write_bytes(path, buf.getvalue())


# --------------------------------------------------------------------------- files


def _spec(m: nn.Module) -> dict:
    name = type(m).__name__
    if isinstance(m, nn.Linear):
        return {"type": name, "args": [m.in_features, m.out_features]}
    if isinstance(m, (nn.Conv1d, nn.Conv2d)):
        return {"type": name, "args": [m.in_channels, m.out_channels, list(m.kernel_size)],
                "kwargs": {"stride": list(m.stride), "padding": list(m.padding),
                           "dilation": list(m.dilation), "groups": m.groups}}
    if isinstance(m, nn.Flatten):
        return {"type": name, "kwargs": {"start_dim": m.start_dim, "end_dim": m.end_dim}}
    if isinstance(m, (nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d)):
        keys = ("kernel_size", "stride", "padding") + (
            ("ceil_mode",) if not isinstance(m, (nn.AvgPool1d,)) else ())
        return {"type": name, "kwargs": {k: _plain_value(getattr(m, k)) for k in keys}}
    if isinstance(m, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)):
        return {"type": name, "args": [_plain_value(m.output_size)]}
    if isinstance(m, nn.ReLU):
        return {"type": name}
    raise PnnhError(f"cannot write layer {name} to the plain file format (Conv/Linear/ReLU/"
                    "pooling/Flatten only); use --format onnx for this model", field="format")


def _plain_value(v):
    return list(v) if isinstance(v, tuple) else v


def save_plain(plain: nn.Sequential, path: str | Path, meta: dict | None = None) -> Path:
    """Write an exported ``nn.Sequential`` as layer specs + weights (no pickled objects), with
    the ``sha256`` content digest checkpoints carry (:func:`pnnh.io.content_digest`)."""
    body = {"layers": [_spec(m) for m in plain], "state_dict": plain.state_dict(),
            "meta": dict(meta or {})}
    payload = {"format": PLAIN_FORMAT, "sha256": content_digest(body), **body}
    buf = io.BytesIO()
    torch.save(payload, buf)
    return atomic_write_bytes(path, buf.getvalue())


def load_plain(path: str | Path) -> nn.Sequential:
    """Rebuild the ``nn.Sequential`` written by :func:`save_plain` (``weights_only`` load)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"plain model file not found: {path}", field="checkpoint")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if payload.get("format") != PLAIN_FORMAT:
            raise ValueError("wrong format tag")
        verify_digest(path, payload, "(written by an older pnnh or by hand); export it again")
        layers = []
        for spec in payload["layers"]:
            cls = getattr(nn, spec["type"])
            if not (issubclass(cls, _LAYERS) or issubclass(cls, _PASS)):
                raise ValueError(f"unexpected layer {spec['type']}")
            kwargs = {k: tuple(v) if isinstance(v, list) else v
                      for k, v in spec.get("kwargs", {}).items()}
            args = [tuple(a) if isinstance(a, list) else a for a in spec.get("args", [])]
            layers.append(cls(*args, **kwargs))
        model = nn.Sequential(*layers)
        model.load_state_dict(payload["state_dict"])
    except CheckpointError:
        raise
    except Exception as e:  # any malformed file is the user's file problem
        raise CheckpointError(f"cannot load plain model {path}: {str(e)[:200]}",
                              field="checkpoint") from None
    return model.eval()
