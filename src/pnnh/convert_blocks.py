"""One residual block -> plain layers: reading a block, and the carrier construction.

A block (post- or pre-activation, any number of branch layers) is read into a
:class:`BlockSpec` — its branch layers ``L₁ … L_k`` (BatchNorm folded, dense weights), its
shortcut ``S`` (``None`` = identity) and where its ReLUs are — by :func:`read_block`, which
refuses, in one line naming the block and its class, anything without an exact plain form
(squeeze-excitation, attention, clipped activations, GroupNorm, anti-aliasing pools, unknown
sub-modules). :func:`build_block` then writes ``k`` plain layers.

**The stream.** Between blocks the plain network holds a *stream*: either the block input
``x`` itself (post-activation nets: ``x = relu(·) >= 0``; ``"x"``), a signed tensor (``"raw"``:
a stem that ends in a conv or a max-pool of a signed tensor), or *heads*: the concatenation
``[relu(γ₁ z + β₁); relu(γ₂ z + β₂); …]`` of per-channel affine maps of the block's signed input
``z`` (pre-activation nets: the next block's ``relu(norm1(z))`` and the signed carrier pair
``relu(z), relu(−z)``, since ``relu(z) − relu(−z) = z``).

**The carrier.** The shortcut's input ``u`` (``x``, ``z`` or ``relu(norm1(z))``) is a linear map
``R_in`` of the stream. Layer 1 takes non-negative carrier channels from the stream (the
channels ``R_in`` reads; a signed stream is split as ``[I; −I]``), each later layer passes them
on with a centred Dirac kernel (the channel itself, at the centre tap: a ReLU output crosses the
next ReLU unchanged), and the last layer ``k`` reads ``S R`` from them, ``S`` embedded at the
tap that reads the same input pixel. Layer ``i`` is then::

    rows [Lᵢ, 0; 0, δ]  (i < k),      last layer [L_k, S·R] (+ biases b_k + b_S),

and the block's output ReLU (post-activation) or the next block's heads (pre-activation: rows
``diag(γ)·[L_k, S R]``, bias ``γ(b_k + b_S) + β`` per head) close it. A shortcut that does not
fit the last layer's kernel (a 2x2 stride-2 kernel beside a 3x3 stride-2 conv) is applied at
the layer whose stride it shares and carried on as the signed pair ``[S u; −S u]``.

**Cost.** The carrier adds ``c`` channels to every hidden layer (``c = C`` for an identity
shortcut on a non-negative input, ``2C`` for a signed one). In a layer whose branch part is
block-diagonal (any layer but the first and last of a block), the carrier's Dirac rows are
block-diagonal too, and :func:`regroup` writes the layer as a grouped convolution: for a
ResNet-50 Bottleneck the 3x3 layer becomes ``groups = (m + C)/m`` instead of a dense
``(m + C)² · 9`` kernel (docs/PNNH.md, "What it costs").
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from pnnh.coder import fold_bn
from pnnh.errors import ConfigError

_CONV = (nn.Conv1d, nn.Conv2d)


@dataclass
class Affine:
    """An affine layer with BatchNorm folded: dense weight ``(out, in, *k)`` (groups expanded)."""

    w: torch.Tensor
    b: torch.Tensor
    kind: type = nn.Conv2d
    stride: tuple = ()
    padding: tuple = ()
    dilation: tuple = ()

    @property
    def kernel(self) -> tuple:
        return tuple(self.w.shape[2:])


@dataclass
class BlockSpec:
    """A residual block as data: ``z -> [pre-norm, ReLU] -> L₁ -> ReLU -> … -> L_k``, plus
    shortcut ``S`` (None: identity) reading ``z`` (``reads_preact``: ``relu(norm1(z))``), then
    ``+`` and, post-activation, a ReLU."""

    name: str
    cls: str
    branch: list[Affine]
    shortcut: Affine | None
    preact: tuple[torch.Tensor, torch.Tensor] | None = None  # (γ, β) of norm1, pre-activation
    reads_preact: bool = False
    module: nn.Module | None = field(default=None, repr=False)


def _refuse(name: str, block: nn.Module, why: str) -> ConfigError:
    return ConfigError(f"cannot convert block {name} ({type(block).__name__}): {why}",
                       field="model")


# --------------------------------------------------------------------------- reading

_WHY = {
    "se": "a squeeze-excitation gate multiplies the branch by a sigmoid of its own pooled "
          "features (a product of two signals): no plain form",
    "attn": "attention multiplies signals (softmax(QKᵀ)V): no plain form",
    "aa": "an anti-aliasing pool between its layers is not supported (timm's BlurPool2d pads by "
          "reflection, which is no zero-padded convolution)",
}
_ACTS_WHY = {
    "ReLU6": "ReLU6 clips: relu6(z) - relu6(-z) = clip(z, -6, 6), so no exact carrier crosses "
             "it (only a non-negative identity carrier below 6 would)",
    "Hardswish": "hard-swish has the exact pair carrier hardswish(z) - hardswish(-z) = z, but "
                 "this converter writes ReLU layers only (docs/PNNH.md)",
}


def _check_act(name: str, block: nn.Module, act: nn.Module | None) -> None:
    if act is None or type(act) is nn.ReLU or isinstance(act, nn.Identity):
        return
    kind = type(act).__name__
    why = _ACTS_WHY.get(kind, f"activation {kind}: this converter writes ReLU layers only "
                              "(the carrier relu(z) - relu(-z) = z)")
    raise _refuse(name, block, why)


def norm_affine(name: str, block: nn.Module, norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(γ', β')`` with ``norm(z) = γ' z + β'`` (eval BatchNorm), refusing other norms."""
    if not isinstance(norm, nn.modules.batchnorm._BatchNorm):
        raise _refuse(name, block, f"{type(norm).__name__} normalises with per-sample "
                                   "statistics: not an affine map in eval mode, no plain form")
    scale = (norm.weight if norm.weight is not None else 1.0) / torch.sqrt(
        norm.running_var + norm.eps)
    shift = -norm.running_mean * scale + (norm.bias if norm.bias is not None else 0.0)
    return scale.detach().clone(), shift.detach().clone()


def _act_of_norm(norm: nn.Module | None) -> nn.Module | None:
    """The activation inside a timm ``BatchNormAct2d`` (None for a plain BatchNorm)."""
    return getattr(norm, "act", None) if norm is not None else None


def dense_weight(layer: nn.Module) -> torch.Tensor:
    """A Conv's weight with its groups expanded into a block-diagonal ``(out, in, *k)`` tensor."""
    w = layer.weight.detach()
    g = getattr(layer, "groups", 1)
    if g == 1:
        return w.clone()
    out, cin_g = w.shape[0], w.shape[1]
    full = w.new_zeros(out, cin_g * g, *w.shape[2:])
    og = out // g
    for i in range(g):
        full[i * og:(i + 1) * og, i * cin_g:(i + 1) * cin_g] = w[i * og:(i + 1) * og]
    return full


def _affine(name: str, block: nn.Module, layer: nn.Module, norm: nn.Module | None) -> Affine:
    if type(layer) not in (nn.Linear, *_CONV):
        raise _refuse(name, block, f"layer {type(layer).__name__} is not a Linear/Conv1d/Conv2d "
                                   "(a weight-standardised or dynamically padded conv has no "
                                   "fixed plain form)")
    if norm is not None and not isinstance(norm, nn.modules.batchnorm._BatchNorm):
        norm_affine(name, block, norm)  # raises with the reason
    w, b = fold_bn(dense_weight(layer), layer.bias, norm if norm is not None else nn.Identity())
    if isinstance(layer, nn.Linear):
        return Affine(w, b, nn.Linear)
    if isinstance(layer.padding, str) or getattr(layer, "padding_mode", "zeros") != "zeros":
        raise _refuse(name, block, f"conv padding {layer.padding!r} ({layer.padding_mode}) is "
                                   "not a fixed zero padding")
    return Affine(w, b, type(layer), tuple(layer.stride), tuple(layer.padding),
                  tuple(layer.dilation))


def _shortcut(name: str, block: nn.Module) -> Affine | None:
    """The shortcut as an affine conv (None: identity), from the layouts people use:
    ``Sequential(conv, bn)`` (torchvision, timm), timm's ``DownsampleConv`` (``conv``/``norm``),
    pnnh's ``FixedProjection`` (zero pad (0, 1, 0, 1) + 2x2 stride-2 conv + its ``norm``)."""
    sc = getattr(block, "downsample", None)
    if sc is None:
        sc = getattr(block, "shortcut", None)
    if sc is None or isinstance(sc, nn.Identity):
        return None
    pad = getattr(sc, "pad", None)
    if isinstance(pad, nn.ZeroPad2d) and isinstance(getattr(sc, "conv", None), nn.Conv2d):
        if tuple(pad.padding)[0::2] != (0, 0):
            raise _refuse(name, block, "its shortcut pads on the left/top")
        norm = getattr(sc, "norm", None)
        a = _affine(name, block, sc.conv, None if isinstance(norm, nn.Identity) else norm)
        a.padding = (0, 0)
        return a
    parts = list(sc) if isinstance(sc, nn.Sequential) else [
        m for m in (getattr(sc, "pool", None), getattr(sc, "conv", None),
                    getattr(sc, "norm", None)) if m is not None]
    parts = [m for m in parts if not isinstance(m, nn.Identity)]
    if not parts or type(parts[0]) not in (nn.Linear, *_CONV):
        what = type(parts[0]).__name__ if parts else type(sc).__name__
        raise _refuse(name, block, f"shortcut starts with {what}: only a conv (+ BatchNorm) "
                                   "shortcut converts (an average-pool shortcut with "
                                   "count_include_pad=False is a convolution only on even sizes)")
    norm = parts[1] if len(parts) > 1 else None
    if len(parts) > 2 or (norm is not None and _act_of_norm(norm) not in (None,)
                          and not isinstance(_act_of_norm(norm), nn.Identity)):
        raise _refuse(name, block, "its shortcut is more than conv + BatchNorm")
    return _affine(name, block, parts[0], norm)


_KNOWN = re.compile(r"(conv|bn|norm|fc)\d+|relu|act\d*|drop_block|drop_path|aa|downsample|"
                    r"shortcut|se|attn")


def _layer_names(block: nn.Module) -> list[str]:
    convs = sorted((n for n, _ in block.named_children() if re.fullmatch(r"(conv|fc)\d+", n)),
                   key=lambda n: int(re.sub(r"\D", "", n)))
    return convs


def _norm(block: nn.Module, i: int) -> nn.Module | None:
    for prefix in ("bn", "norm"):
        m = getattr(block, f"{prefix}{i}", None)
        if isinstance(m, nn.Module):
            return m
    return None


def _check_children(name: str, block: nn.Module) -> None:
    for child, m in block.named_children():
        if not _KNOWN.fullmatch(child):
            raise _refuse(name, block, f"unknown sub-module {child!r} ({type(m).__name__}): "
                                       "only conv/bn/act/drop/shortcut parts are understood")
        if child in ("se", "attn") and not isinstance(m, nn.Identity):
            raise _refuse(name, block, _WHY[child])
        if child == "aa" and not isinstance(m, nn.Identity):
            raise _refuse(name, block, f"{type(m).__name__}: {_WHY['aa']}")
        if child.startswith(("relu", "act")):
            _check_act(name, block, m)
        if child in ("drop_block", "drop_path") and not isinstance(m, nn.Identity) and (
                type(m).__name__ not in ("DropPath", "DropBlock2d")):
            raise _refuse(name, block, f"{child} is {type(m).__name__}, not a DropPath/"
                                       "DropBlock2d (identities in eval mode)")


def _is_preact(block: nn.Module, first: nn.Module) -> bool:
    if "preact" in type(block).__name__.lower():
        return True
    n1 = _norm(block, 1)
    width = getattr(first, "out_channels", getattr(first, "out_features", None))
    cin = getattr(first, "in_channels", getattr(first, "in_features", None))
    return n1 is not None and n1.num_features != width and n1.num_features == cin


def read_block(name: str, block: nn.Module) -> BlockSpec:
    """The block as a :class:`BlockSpec`, or one :class:`ConfigError` naming it and why not."""
    _check_children(name, block)
    names = _layer_names(block)
    if len(names) < 2:
        raise _refuse(name, block, "expected conv1/conv2[/conv3] or fc1/fc2 branch layers")
    layers = [getattr(block, n) for n in names]
    preact = _is_preact(block, layers[0])
    norms = [_norm(block, i) for i in range(1, len(layers) + 2)]
    if preact:
        pre, post = norms[0], norms[1:len(layers)]
        if pre is None:
            raise _refuse(name, block, "a pre-activation block without norm1")
        _check_act(name, block, _act_of_norm(pre))
        pre_aff = norm_affine(name, block, pre)
        after = post + [None]
    else:
        pre_aff, after = None, norms[:len(layers)]
    for n in after[:-1]:
        _check_act(name, block, _act_of_norm(n))
    branch = [_affine(name, block, layer, norm) for layer, norm in zip(layers, after)]
    last_act = _act_of_norm(after[-1])
    if last_act is not None and not isinstance(last_act, nn.Identity):
        raise _refuse(name, block, "its last norm applies an activation before the addition")
    shortcut = _shortcut(name, block)
    return BlockSpec(name, type(block).__name__, branch, shortcut, pre_aff,
                     reads_preact=preact and shortcut is not None, module=block)


# --------------------------------------------------------------------------- geometry


def _dirac(a: Affine, c: int, name: str) -> torch.Tensor:
    """``δ``: ``c`` channels passed through ``a``'s kernel at its centre tap."""
    eye = torch.eye(c, dtype=a.w.dtype, device=a.w.device)
    if a.kind is nn.Linear:
        return eye
    k = a.kernel
    for s, p, d in zip(k, a.padding, a.dilation):
        if s % 2 == 0 or p != d * (s - 1) // 2:
            raise ConfigError(f"cannot convert block {name}: the carrier needs a centred kernel "
                              f"(odd size, padding = dilation·(k−1)/2), got kernel {k}, padding "
                              f"{a.padding}", field="model")
    out = eye.new_zeros(c, c, *k)
    out[(slice(None), slice(None)) + tuple(s // 2 for s in k)] = eye
    return out


def _embed(s: Affine, a: Affine, before: tuple) -> torch.Tensor | None:
    """``S``'s kernel placed in layer ``a``'s kernel so that both read the same input pixels,
    when the carrier reaching ``a`` is the shortcut's input subsampled by ``before``; None if it
    does not fit (tap ``t`` of ``S`` reads ``s_S·i − p_S + t``; tap ``u`` of ``a`` reads
    ``before·(s_a·i − p_a + d_a·u)``)."""
    if a.kind is nn.Linear or s.kind is nn.Linear:
        return s.w.clone() if a.kind is s.kind else None
    out = s.w.new_zeros(*s.w.shape[:2], *a.kernel)
    index = []
    for ks, ss, ps, ka, sa, pa, da, pre in zip(s.kernel, s.stride, s.padding, a.kernel,
                                               a.stride, a.padding, a.dilation, before):
        if pre * sa != ss:
            return None
        taps = []
        for t in range(ks):
            num = t - ps
            if num % pre:
                return None
            u = num // pre + pa
            if u % da or not 0 <= u // da < ka:
                return None
            taps.append(u // da)
        if taps != list(range(taps[0], taps[0] + ks)) and ks > 1:
            return None
        index.append(slice(taps[0], taps[0] + ks))
    out[(slice(None), slice(None), *index)] = s.w
    return out


# --------------------------------------------------------------------------- building


def regroup(kind: type, w: torch.Tensor, b: torch.Tensor, like: Affine) -> nn.Module:
    """The layer holding dense weight ``w``, as a grouped conv with the largest ``groups`` whose
    block-diagonal pattern holds every nonzero of ``w`` (the same function, fewer weights)."""
    if kind is nn.Linear:
        out = nn.Linear(w.shape[1], w.shape[0])
        groups = 1
    else:
        cout, cin = w.shape[:2]
        mask = w.abs().flatten(2).sum(2) != 0
        groups = 1
        for g in sorted((d for d in range(2, math.gcd(cout, cin) + 1)
                         if cout % d == 0 and cin % d == 0), reverse=True):
            blocks = mask.reshape(g, cout // g, g, cin // g).any(dim=(1, 3))
            if not (blocks & ~torch.eye(g, dtype=torch.bool)).any():
                groups = g
                break
        out = kind(cin, cout, like.kernel, like.stride, like.padding, like.dilation,
                   groups=groups, bias=True)
        if groups > 1:
            og, ig = cout // groups, cin // groups
            w = torch.cat([w[i * og:(i + 1) * og, i * ig:(i + 1) * ig] for i in range(groups)])
    out = out.to(w)
    with torch.no_grad():
        out.weight.copy_(w)
        out.bias.copy_(b)
    return out


@dataclass
class Stream:
    """What the plain network holds between blocks: ``"x"`` (a non-negative ``x``), ``"raw"``
    (a signed ``z``) or heads ``[(γ, β), …]`` (``cat relu(γ z + β)``), over ``channels``."""

    channels: int
    heads: list | str

    @property
    def width(self) -> int:
        return self.channels * (len(self.heads) if isinstance(self.heads, list) else 1)

    def encode(self, z: torch.Tensor) -> torch.Tensor:
        """The stream's tensor for block input ``z``."""
        if not isinstance(self.heads, list):
            return z
        shape = (1, -1) + (1,) * (z.dim() - 2)
        return torch.cat([torch.relu(g.reshape(shape) * z + b.reshape(shape))
                          for g, b in self.heads], dim=1)

    def head(self, key) -> int | None:
        if not isinstance(self.heads, list):
            return None
        for i, (g, b) in enumerate(self.heads):
            if isinstance(key, tuple) and torch.equal(g, key[0]) and torch.equal(b, key[1]):
                return i
        return None


def signed_heads(c: int, like: torch.Tensor) -> list:
    """The carrier pair ``relu(z), relu(−z)`` as heads."""
    one = torch.ones(c, dtype=like.dtype, device=like.device)
    return [(one, torch.zeros_like(one)), (-one, torch.zeros_like(one))]


def input_heads(spec: BlockSpec) -> list | None:
    """The heads a pre-activation block needs in its input stream (None: post-activation)."""
    if spec.preact is None:
        return None
    g, b = spec.preact
    return [(g, b)] + ([] if spec.reads_preact else signed_heads(g.numel(), g))


def _maps(spec: BlockSpec, stream: Stream):
    """``(B, U)``: the branch's input and the shortcut's input as matrices over the stream."""
    c = stream.channels
    eye = torch.eye(c, dtype=spec.branch[0].w.dtype)
    blocks = len(stream.heads) if isinstance(stream.heads, list) else 1

    def pick(i):
        m = eye.new_zeros(c, c * blocks)
        m[:, i * c:(i + 1) * c] = eye
        return m

    if spec.preact is None:
        if isinstance(stream.heads, list) and len(stream.heads) == 2:  # a signed pair
            z = pick(0) - pick(1)
            return z, z
        if stream.heads not in ("x", "raw"):
            raise ConfigError(f"cannot convert block {spec.name}: a post-activation block after "
                              "pre-activation blocks", field="model")
        return eye, eye
    a = pick(0)
    if spec.reads_preact:
        return a, a
    return a, pick(1) - pick(2)


def _mm(w: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``w`` (``out, in, *k``) composed with a channel map ``m`` (``in, in'``)."""
    return torch.einsum("oi...,ij->oj...", w, m.to(w))


def _pair(c: int, like: torch.Tensor) -> torch.Tensor:
    """``[I, −I]``: reads ``u`` back from the carrier pair ``relu(u), relu(−u)``."""
    eye = torch.eye(c, dtype=like.dtype, device=like.device)
    return torch.cat([eye, -eye], dim=1)


def _identity_shortcut(n: int, like: Affine) -> Affine:
    d = like.w.dim() - 2
    w = torch.eye(n, dtype=like.w.dtype).reshape(n, n, *(1,) * d)
    return Affine(w, like.b.new_zeros(n), like.kind, (1,) * d, (0,) * d, (1,) * d)


def _where_shortcut(spec: BlockSpec, sc: Affine) -> tuple[int, torch.Tensor]:
    """The layer where ``S`` is applied (the last one if it fits: no signed pair needed) and
    ``S`` embedded in that layer's kernel."""
    layers = spec.branch
    for j in reversed(range(len(layers))):
        before = tuple(math.prod(a.stride[d] for a in layers[:j])
                       for d in range(len(layers[j].stride)))
        s_emb = _embed(sc, layers[j], before)
        if s_emb is not None:
            return j, s_emb
    raise ConfigError(f"cannot convert block {spec.name} ({spec.cls}): its shortcut (kernel "
                      f"{sc.kernel}, stride {sc.stride}) reads pixels no branch layer reads",
                      field="model")


def build_block(spec: BlockSpec, stream: Stream, out_heads: list | None) -> list[nn.Module]:
    """Plain layers for ``spec`` reading ``stream``; post-activation blocks end in their ReLU,
    pre-activation ones in ``out_heads`` (each ``relu(γ z' + β)`` of the block output ``z'``).

    Layer ``i`` stacks the branch rows (reading the branch's hidden units) over the carrier
    rows (reading the carrier): centred Dirac kernels before the shortcut is applied, ``[S R;
    −S R]`` where it is applied before the last layer, Dirac kernels on the pair after it; the
    last layer reads ``[L_k, S R]`` (or ``[L_k, R]`` with ``R = [I, −I]``).
    """
    layers, k = spec.branch, len(spec.branch)
    bmap, umap = _maps(spec, stream)
    sc = spec.shortcut if spec.shortcut is not None else _identity_shortcut(umap.shape[0],
                                                                            layers[0])
    at, s_emb = _where_shortcut(spec, sc)
    if at == 0:  # S reads the stream directly
        carry_in, readout = umap, None
    elif stream.heads == "raw":  # a signed stream crosses as [u; −u]
        carry_in, readout = torch.cat([umap, -umap]), _pair(umap.shape[0], umap)
    else:  # non-negative stream channels, read back by R
        cols = umap.abs().sum(0) != 0
        carry_in, readout = torch.eye(umap.shape[1], dtype=umap.dtype)[cols], umap[:, cols]
    out: list[nn.Module] = []
    for i, a in enumerate(layers[:-1]):
        w = a.w if i else _mm(a.w, bmap)
        if i == at:  # S applied here, carried on as the signed pair [S u; −S u]
            s_w = _mm(s_emb, carry_in if i == 0 else readout)
            rows, carry_b = torch.cat([s_w, -s_w]), torch.cat([sc.b, -sc.b])
            readout = _pair(s_w.shape[0], s_w)
        else:
            c = carry_in.shape[0] if i < at else readout.shape[1]
            rows = _dirac(a, c, spec.name)
            rows = _mm(rows, carry_in) if i == 0 else rows
            carry_b = a.b.new_zeros(c)
        if i:  # input channels [h; carrier]
            w = torch.cat([w, w.new_zeros(w.shape[0], rows.shape[1], *w.shape[2:])], dim=1)
            rows = torch.cat([rows.new_zeros(rows.shape[0], a.w.shape[1], *rows.shape[2:]),
                              rows], dim=1)
        out += [regroup(a.kind, torch.cat([w, rows]), torch.cat([a.b, carry_b]), a), nn.ReLU()]
    a = layers[-1]
    if at == k - 1:
        cw, bias = _mm(s_emb, readout), a.b + sc.b
    else:
        cw, bias = _mm(_dirac(a, readout.shape[0], spec.name), readout), a.b
    full = torch.cat([a.w, cw], dim=1)
    heads = out_heads if out_heads is not None else [(torch.ones_like(bias),
                                                      torch.zeros_like(bias))]
    shape = (-1,) + (1,) * (full.dim() - 1)
    hw = torch.cat([g.reshape(shape) * full for g, _ in heads])
    hb = torch.cat([g * bias + be for g, be in heads])
    return out + [regroup(a.kind, hw, hb, a), nn.ReLU()]


@torch.no_grad()
def verify_block(spec: BlockSpec, stream: Stream, out_stream: Stream,
                 layers: list[nn.Module]) -> None:
    """Run the block and its plain layers on a seeded probe; a block whose forward is not what
    :func:`read_block` read (whatever its sub-modules are called) fails here, by name."""
    a = spec.branch[0]
    g = torch.Generator().manual_seed(0)
    shape = (3, stream.channels) + (8,) * (a.w.dim() - 2)
    z = torch.randn(*shape, generator=g).to(a.w)
    if stream.heads == "x":
        z = z.relu()
    block = spec.module
    was = block.training
    block.eval()
    try:
        want = out_stream.encode(block(z))
    finally:
        block.train(was)
    got = nn.Sequential(*layers)(stream.encode(z))
    err = float((got - want).abs().max()) if got.shape == want.shape else float("inf")
    if not err <= 1e-4 * (1 + float(want.abs().max())):
        raise ConfigError(f"cannot convert block {spec.name} ({spec.cls}): its forward is not "
                          f"the residual form read from its modules (plain form off by {err:.3g})",
                          field="model")
