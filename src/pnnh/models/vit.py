"""Vision Transformers: the pre-norm ViT (residual), a plain ViT, and the PNNH-ViT (no skips).

Tokens come from non-overlapping patches: a ``Conv2d`` for images ``(C, H, W)`` or a ``Conv1d``
for sequences ``(C, L)`` such as MNIST-1D ``(1, 40)``, plus a learned position embedding. The
head is ``LayerNorm -> mean over tokens -> Linear``. ``depth`` counts transformer blocks (as in
timm: ViT-Tiny is ``depth=12, width=192, heads=3``), each with four weight matrices
(``qkv``, ``proj``, ``fc1``, ``fc2``). Defaults are CPU-sized (``width=64, heads=4``).

- ``vit_tiny`` (kind ``resnet``), the standard pre-norm block::

      x = x + proj(attn(qkv(LN1(x))))
      x = x + fc2(gelu(fc1(LN2(x))))

- ``plain_vit_tiny`` (kind ``plain``): the same sublayers with the additions removed.

- ``pnnh_vit_tiny`` (kind ``pnnh``): no ``x + f(x)`` anywhere. Each sublayer carries its input
  across itself through a weight-shared coder ``A`` (``m x d``, :class:`pnnh.coder.Coder`)::

      attention:  y = [W_o, Aᵀ] · cat( attn(qkv(u)), A c )  + b_o
      MLP:        y = [Aᵀ, -Aᵀ, D] · φ([A; -A; E] c' + [0; 0; b1]) + b2
                    = AᵀA c' + D φ(E u + b1) + b2         (φ(z) - φ(-z) = z)

  with ``u = LN(x)`` and ``c = x`` (``coder_norm=False``, the default) or ``c = u``. In the
  attention sublayer the coder units are concatenated to the head outputs before the output
  projection, so each token's own input crosses the token mixing through shared weights (a
  token-wise path: no non-linearity acts on it there, so ``A`` is not doubled). In the MLP the
  coder sits in the hidden layer beside the learner ``E, D``; the identity ``φ(z) - φ(-z) = z``
  holds for ReLU and also for GELU (``z Φ(z) + z Φ(-z) = z``), so the ViT keeps its GELU.

  LayerNorm placement: each sublayer starts with its own LayerNorm, as in the pre-norm ViT, and
  the learner (heads, ``E``) reads ``u = LN(x)``. With ``coder_norm=False`` (default) the coder
  reads the raw token (``x_{l+1} = AᵀA x_l + f(LN(x_l))``, the pre-norm stream); with
  ``coder_norm=True`` it reads ``LN(x)``, so ``z_{l+1} = LN(z_l + f(z_l))`` with ``AᵀA`` in place
  of ``I`` — a post-norm stream. With ``zero_init_decoder=True`` (``W_o = D = 0``), ``r = 1``,
  ``A`` orthogonal and zero biases, a block at initialisation is the identity
  (``coder_norm=False``) or ``LN2 ∘ LN1`` (``coder_norm=True``). Defaults
  (``coder_norm=False``, ``zero_init_decoder=False``) are the measured best on MNIST-1D; see
  ``docs/PNNH_VIT.md``.

:func:`vit_to_plain` turns a PNNH-ViT (or a plain ViT) into an equivalent ``nn.Sequential``
with ``[A; -A]`` materialized (no shared weights, no skips).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pnnh.coder import Coder, CoderOptions, attach_constraint
from pnnh.errors import ConfigError
from pnnh.models.layers import StemBlocksHead, drop_path, set_drop_path
from pnnh.registry import register_model

_ACTS = {"gelu": nn.GELU, "relu": nn.ReLU}


def _init_linear(layer: nn.Linear, zero: bool = False) -> None:
    """timm's ViT init: truncated normal (std 0.02) weights, zero bias."""
    if zero:
        nn.init.zeros_(layer.weight)
    else:
        nn.init.trunc_normal_(layer.weight, std=0.02)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


def attend(qkv: torch.Tensor, heads: int, scale: float) -> torch.Tensor:
    """Multi-head self-attention core: ``(B, N, 3d) -> (B, N, d)``, ``softmax(q kᵀ·scale) v``."""
    qkv = qkv.unflatten(-1, (3, heads, -1)).permute(2, 0, 3, 1, 4)  # (3, B, h, N, d/h)
    q, k, v = qkv[0], qkv[1], qkv[2]
    a = (q @ k.transpose(-2, -1) * scale).softmax(dim=-1)
    return (a @ v).transpose(1, 2).flatten(2)


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch_size`` patches (1-D or 2-D) to tokens, plus position embedding."""

    def __init__(self, in_shape, patch_size: int, width: int):
        super().__init__()
        channels, *spatial = (int(s) for s in in_shape)
        if len(spatial) not in (1, 2):
            raise ValueError(f"in_shape must be (C, L) or (C, H, W), got {tuple(in_shape)}")
        if patch_size < 1 or any(s % patch_size for s in spatial):
            raise ValueError(
                f"patch_size={patch_size} must divide the input size {tuple(spatial)}"
            )
        conv = nn.Conv1d if len(spatial) == 1 else nn.Conv2d
        self.proj = conv(channels, width, patch_size, stride=patch_size)
        self.num_tokens = math.prod(s // patch_size for s in spatial)
        self.pos = nn.Parameter(torch.zeros(1, self.num_tokens, width))
        nn.init.trunc_normal_(self.pos, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2) + self.pos


class TokenMean(nn.Module):
    """Mean over the token axis: ``(B, N, d) -> (B, d)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=1)


class Attention(nn.Module):
    """``proj(attn(qkv(u)))``: standard multi-head self-attention."""

    def __init__(self, width: int, heads: int, zero_init_proj: bool = False):
        super().__init__()
        if width % heads:
            raise ValueError(f"width={width} must be divisible by heads={heads}")
        self.heads, self.scale = heads, (width // heads) ** -0.5
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        _init_linear(self.qkv)
        _init_linear(self.proj, zero=zero_init_proj)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.proj(attend(self.qkv(u), self.heads, self.scale))


class Mlp(nn.Module):
    """``fc2(φ(fc1(u)))``."""

    def __init__(self, width: int, hidden: int, act: str = "gelu", zero_init_fc2: bool = False):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = _ACTS[act]()
        self.fc2 = nn.Linear(hidden, width)
        _init_linear(self.fc1)
        _init_linear(self.fc2, zero=zero_init_fc2)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(u)))


class ViTBlock(nn.Module):
    """Pre-norm transformer block; ``residual=False`` drops both additions (a plain block)."""

    def __init__(self, width: int, heads: int, hidden: int, act: str = "gelu",
                 residual: bool = True, zero_init_residual: bool = False):
        super().__init__()
        self.residual = residual
        self.ln1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads, zero_init_residual)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = Mlp(width, hidden, act, zero_init_residual)
        self.drop_path = 0.0  # stochastic depth of each residual branch (training only)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.residual:
            x = x + drop_path(self.attn(self.ln1(x)), self.drop_path, self.training)
            return x + drop_path(self.mlp(self.ln2(x)), self.drop_path, self.training)
        return self.mlp(self.ln2(self.attn(self.ln1(x))))


class CoderAttention(nn.Module):
    """Attention sublayer with a token-wise internal path (no skip)::

        y = [W_o, Aᵀ] · cat(attn(qkv(u)), A c) + b_o,   u = LN(x),  c = u or x

    The coder units ``A c`` are concatenated to the head outputs, and the output projection's
    columns for them are ``Aᵀ`` (the same parameter): the token's own input crosses the sublayer
    as ``AᵀA c``, through the sublayer's layers. ``zero_init_proj`` zeroes ``W_o``. With a fixed
    ``A = I`` (the default) and ``fused`` (the training form) it computes ``W_o attn + b_o + c``,
    the same numbers without the two products by ``A``; ``fused=False`` keeps them. In training,
    ``drop_path`` > 0 drops the learner term ``W_o attn + b_o`` per sample (stochastic depth:
    the sublayer then carries ``AᵀA c`` alone), computed as two products instead of one.
    """

    def __init__(self, width: int, heads: int, coder_ratio: float = 1.0,
                 coder_init: str = "orthogonal", coder_norm: bool = False,
                 zero_init_proj: bool = False, fused: bool = True):
        super().__init__()
        if width % heads:
            raise ValueError(f"width={width} must be divisible by heads={heads}")
        self.heads, self.scale, self.coder_norm = heads, (width // heads) ** -0.5, coder_norm
        self.fused = fused
        self.norm = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.coder = Coder(width, coder_ratio, init=coder_init)
        self.proj = nn.Linear(width, width)  # W_o (head columns) and b_o
        self.drop_path = 0.0
        _init_linear(self.qkv)
        _init_linear(self.proj, zero=zero_init_proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.norm(x)
        heads, c = attend(self.qkv(u), self.heads, self.scale), u if self.coder_norm else x
        if self.fused and self.coder.passes_input:  # A = I: [W_o, Aᵀ]·(attn; A c) = W_o attn + c
            return drop_path(self.proj(heads), self.drop_path, self.training) + c
        a = self.coder.weight  # (m, d)
        if self.training and self.drop_path > 0:  # the learner term alone, to drop it
            return drop_path(self.proj(heads), self.drop_path, True) + F.linear(F.linear(c, a), a.t())
        w = torch.cat([self.proj.weight, a.t()], dim=1)
        return F.linear(torch.cat([heads, F.linear(c, a)], -1), w, self.proj.bias)


class CoderMlp(nn.Module):
    """MLP sublayer with coder units in its hidden layer (no skip)::

        y = [Aᵀ, -Aᵀ, D] φ([A; -A; E] · (c; u) + [0; 0; b1]) + b2,   u = LN(x), c = u or x
          = AᵀA c + D φ(E u + b1) + b2                               (fused, φ(z) - φ(-z) = z)

    ``fused=False`` computes the ``[A; -A]`` form (twice the coder units); same outputs.
    ``drop_path`` > 0 drops the learner term ``D φ(E u + b1) + b2`` per sample in training.
    """

    def __init__(self, width: int, hidden: int, act: str = "gelu", coder_ratio: float = 1.0,
                 coder_init: str = "orthogonal", coder_norm: bool = False,
                 zero_init_decoder: bool = False, fused: bool = True):
        super().__init__()
        self.coder_norm, self.fused = coder_norm, fused
        self.norm = nn.LayerNorm(width)
        self.coder = Coder(width, coder_ratio, init=coder_init)
        self.fc1 = nn.Linear(width, hidden)  # E, b1
        self.act = _ACTS[act]()
        self.fc2 = nn.Linear(hidden, width)  # D, b2
        self.drop_path = 0.0
        _init_linear(self.fc1)
        _init_linear(self.fc2, zero=zero_init_decoder)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.norm(x)
        c = u if self.coder_norm else x
        if not self.fused:
            z = self.coder.encode(c)
            c = self.coder.decode(self.act(z)) - self.coder.decode(self.act(-z))
        elif not self.coder.passes_input:  # with a fixed A = I, AᵀA c is c itself
            c = self.coder.decode(self.coder.encode(c))
        return c + drop_path(self.fc2(self.act(self.fc1(u))), self.drop_path, self.training)


class PNNHViTBlock(nn.Module):
    """``mlp(attn(x))`` with :class:`CoderAttention` and :class:`CoderMlp`: no additions of x."""

    def __init__(self, width: int, heads: int, hidden: int, act: str = "gelu",
                 coder_ratio: float = 1.0, coder_init: str = "orthogonal",
                 coder_norm: bool = False, zero_init_decoder: bool = False, fused: bool = True):
        super().__init__()
        self.attn = CoderAttention(width, heads, coder_ratio, coder_init, coder_norm,
                                   zero_init_decoder, fused)
        self.mlp = CoderMlp(width, hidden, act, coder_ratio, coder_init, coder_norm,
                            zero_init_decoder, fused)

    @property
    def drop_path(self) -> float:
        """Stochastic depth of the block's two learner terms (one rate, as timm's ViT block)."""
        return self.mlp.drop_path

    @drop_path.setter
    def drop_path(self, rate: float) -> None:
        self.attn.drop_path = self.mlp.drop_path = float(rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.attn(x))


class ViT(StemBlocksHead):
    """``stem`` (patches + positions) -> ``blocks`` -> ``head`` (LN, token mean, Linear)."""

    def __init__(self, in_shape, num_classes: int, width: int, patch_size: int,
                 blocks: list[nn.Module]):
        stem = PatchEmbed(in_shape, patch_size, width)
        head = nn.Sequential(nn.LayerNorm(width), TokenMean(), nn.Linear(width, num_classes))
        _init_linear(head[2])
        super().__init__(in_shape, stem, blocks, head)


def _check(depth: int, width: int, heads: int, mlp_ratio: float, act: str) -> int:
    if int(depth) < 1:
        raise ValueError(f"depth (transformer blocks) must be at least 1, got {depth}")
    if int(width) < 1 or int(heads) < 1 or width % heads:
        raise ValueError(f"width={width} must be a positive multiple of heads={heads}")
    if act not in _ACTS:
        raise ValueError(f"act must be one of {', '.join(_ACTS)}, got {act!r}")
    hidden = int(round(mlp_ratio * width))
    if hidden < 1:
        raise ValueError(f"mlp_ratio={mlp_ratio} gives no hidden units")
    return hidden


@register_model(family="vit", kind="resnet")
def vit_tiny(in_shape=(1, 40), num_classes: int = 10, depth: int = 6, width: int = 64,
             heads: int = 4, patch_size: int = 4, mlp_ratio: float = 4.0, act: str = "gelu",
             zero_init_residual: bool = False, drop_path_rate: float = 0.0) -> ViT:
    """Pre-norm ViT with residual additions; depth = transformer blocks; 1-D or 2-D patches.
    ``drop_path_rate``: stochastic depth of both branches of every block, rising linearly to
    the last block (timm's rule; :func:`~pnnh.models.layers.set_drop_path`)."""
    hidden = _check(depth, width, heads, mlp_ratio, act)
    blocks = [ViTBlock(width, heads, hidden, act, True, zero_init_residual)
              for _ in range(int(depth))]
    set_drop_path(blocks, drop_path_rate)
    return ViT(in_shape, num_classes, width, patch_size, blocks)


@register_model(family="vit", kind="plain")
def plain_vit_tiny(in_shape=(1, 40), num_classes: int = 10, depth: int = 6, width: int = 64,
                   heads: int = 4, patch_size: int = 4, mlp_ratio: float = 4.0,
                   act: str = "gelu") -> ViT:
    """ViT with the residual additions removed (pre-norm sublayers chained): the plain baseline."""
    hidden = _check(depth, width, heads, mlp_ratio, act)
    blocks = [ViTBlock(width, heads, hidden, act, False) for _ in range(int(depth))]
    return ViT(in_shape, num_classes, width, patch_size, blocks)


#: The PNNH-ViT's coder defaults: a fixed ``A = I`` (at ``r = 1`` no ``A`` with ``AᵀA = I``
#: changes the function, so training it buys nothing: docs/PNNH.md), and a learner decoder that
#: starts initialised like the ViT's (truncated normal), not at zero.
VIT_CODER = CoderOptions(zero_init_decoder=False)


@register_model(family="vit", kind="pnnh", options=CoderOptions,
                omit=("coder_kernel", "transition_norm", "transition_coder"))
def pnnh_vit_tiny(in_shape=(1, 40), num_classes: int = 10, depth: int = 6, width: int = 64,
                  heads: int = 4, patch_size: int = 4, mlp_ratio: float = 4.0,
                  act: str = "gelu", coder_norm: bool = False, drop_path_rate: float = 0.0,
                  coder: CoderOptions = VIT_CODER) -> ViT:
    """PNNH-ViT: coder units in the MLP and a token-wise coder path through attention; no skips.
    ``drop_path_rate``: stochastic depth of the learner terms, as in :func:`vit_tiny` (training
    only: the export is unchanged)."""
    hidden = _check(depth, width, heads, mlp_ratio, act)
    if coder.coder_kernel != 1:
        raise ConfigError("coder_kernel: only convolutions take a kernel", field="coder_kernel")
    blocks = [
        PNNHViTBlock(width, heads, hidden, act, coder.coder_ratio, coder.coder_init,
                     bool(coder_norm), coder.zero_init_decoder, coder.fused)
        for _ in range(int(depth))
    ]
    set_drop_path(blocks, drop_path_rate)
    return attach_constraint(ViT(in_shape, num_classes, width, patch_size, blocks), coder)


# --------------------------------------------------------------------------- plain export


class PlainAttention(nn.Module):
    """A plain attention layer with ``m`` pass-through channels (materialized, nothing shared)::

        y = proj(cat(attn(qkv(LN(x))), enc(c))),   c = LN(x) or x

    ``enc`` holds ``A`` and ``proj`` holds ``[W_o, Aᵀ]`` as separate copies.
    """

    def __init__(self, width: int, heads: int, extra: int, coder_norm: bool = True):
        super().__init__()
        self.heads, self.scale, self.coder_norm = heads, (width // heads) ** -0.5, coder_norm
        self.norm = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.enc = nn.Linear(width, extra, bias=False)
        self.proj = nn.Linear(width + extra, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.norm(x)
        c = self.enc(u if self.coder_norm else x)
        return self.proj(torch.cat([attend(self.qkv(u), self.heads, self.scale), c], -1))


class SplitLinear(nn.Module):
    """First MLP layer when the coder reads the raw token: ``cat(coder(x), learner(LN(x)))``."""

    def __init__(self, width: int, coder_units: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.coder = nn.Linear(width, coder_units, bias=False)
        self.learner = nn.Linear(width, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.coder(x), self.learner(self.norm(x))], -1)


def _copy(dst: nn.Module, **tensors: torch.Tensor) -> nn.Module:
    for name, t in tensors.items():
        getattr(dst, name).data.copy_(t.detach())
    return dst


def _copy_norm(dst: nn.LayerNorm, src: nn.LayerNorm) -> nn.LayerNorm:
    dst.eps = src.eps
    return _copy(dst, weight=src.weight, bias=src.bias)


@torch.no_grad()
def _plain_pnnh_block(block: PNNHViTBlock) -> list[nn.Module]:
    at, mlp = block.attn, block.mlp
    width = at.qkv.in_features
    a = at.coder.weight.detach()
    att = PlainAttention(width, at.heads, a.shape[0], at.coder_norm)
    _copy_norm(att.norm, at.norm)
    _copy(att.qkv, weight=at.qkv.weight, bias=at.qkv.bias)
    _copy(att.enc, weight=a)
    _copy(att.proj, weight=torch.cat([at.proj.weight, a.t()], 1), bias=at.proj.bias)

    a = mlp.coder.weight.detach()
    m, hidden = a.shape[0], mlp.fc1.out_features
    enc = torch.cat([a, -a])  # [A; -A]
    dec = torch.cat([a.t(), -a.t()], 1)  # [Aᵀ, -Aᵀ]
    fc2 = _copy(nn.Linear(2 * m + hidden, width), weight=torch.cat([dec, mlp.fc2.weight], 1),
                bias=mlp.fc2.bias)
    act = type(mlp.act)()
    if mlp.coder_norm:
        norm = _copy_norm(nn.LayerNorm(width), mlp.norm)
        fc1 = _copy(nn.Linear(width, 2 * m + hidden), weight=torch.cat([enc, mlp.fc1.weight]),
                    bias=torch.cat([enc.new_zeros(2 * m), mlp.fc1.bias]))
        return [att, norm, fc1, act, fc2]
    fc1 = SplitLinear(width, 2 * m, hidden)
    _copy_norm(fc1.norm, mlp.norm)
    _copy(fc1.coder, weight=enc)
    _copy(fc1.learner, weight=mlp.fc1.weight, bias=mlp.fc1.bias)
    return [att, fc1, act, fc2]


def vit_to_plain(model: ViT) -> nn.Sequential:
    """An equivalent ``nn.Sequential`` for a PNNH-ViT or plain ViT (copies; ``model`` is untouched).

    Layers: the patch embedding, then per block ``PlainAttention`` (LayerNorm, qkv with the
    coder's ``A`` beside it, output projection ``[W_o, Aᵀ]``), ``LayerNorm``,
    ``Linear [A; -A; E]``, activation, ``Linear [Aᵀ, -Aᵀ, D]``; then LayerNorm, token mean and
    the classifier. Outputs equal the model's up to float error. A residual ViT raises
    ``ValueError`` (its additions are skips).
    """
    import copy

    layers: list[nn.Module] = [copy.deepcopy(model.stem)]
    for i, block in enumerate(model.blocks):
        if isinstance(block, PNNHViTBlock):
            layers += _plain_pnnh_block(block)
        elif isinstance(block, ViTBlock) and not block.residual:
            layers += [copy.deepcopy(m) for m in (block.ln1, block.attn, block.ln2, block.mlp)]
        else:
            raise ValueError(f"block {i} ({type(block).__name__}) is not a plain or PNNH block")
    layers += [copy.deepcopy(m) for m in model.head]
    out = nn.Sequential(*layers)
    out.train(model.training)
    return out
