"""Tailored Activation Transformation (TAT) for plain ReLU nets: the deep vanilla-net peer.

TAT (Zhang, Martens, Grosse et al., "Deep Learning without Shortcuts: Shaping the Kernel
with Tailored Rectifiers", ICLR 2022; DeepMind's ``dks`` package) trains deep plain nets by
shaping the network's kernel at initialisation. For rectifiers it replaces every ReLU by a
scaled leaky ReLU

    φ̂(x) = sqrt(2 / (1 + α²)) · leaky_relu(x, α)

whose output scale gives ``Q(1) = 1`` (a unit-variance input stays unit-variance). Its local
C map (correlation in, correlation out, for unit-q inputs) is

    C(c) = [ (1 - α)² (sqrt(1 - c²) + (π - arccos c) c) / π + 2α c ] / (1 + α²),

and for a chain of ``L`` non-linear layers the network's C map is ``C^{∘L}``. TAT picks the
negative slope ``α`` so that ``C^{∘L}(0) = η`` (the paper's η, 0.9 by default): two orthogonal
inputs come out with correlation η, no more — the net is neither too linear (η → 0) nor
degenerate (η → 1). ``C^{∘L}(0)`` falls from its ReLU value (α = 0) to 0 (α = 1, linear), so a
bisection on ``α ∈ [0, 1]`` solves it; a net too shallow for η (``C^{∘L}(0) < η`` even at
α = 0) is an error, as in ``dks``.

Weights use the *scaled uniform orthogonal* (SUO) distribution with Delta initialisation for
convolutions (only the centre tap non-zero, an orthogonal channel matrix), scaled by
``max(sqrt(fan_out / fan_in), 1)`` so that each layer keeps q; biases are zero.

One deliberate difference from ``dks.pytorch.parameter_sampling_functions``: ``dks`` reads a
PyTorch weight as ``[in, out, ...]`` (the JAX layout), so for a non-square PyTorch layer
(``[out, in, ...]``) its scale factor lands on the wrong side — a 40 → 128 Linear comes out
with q ≈ 0.31, a 128 → 10 head with q ≈ 13. :func:`suo_` uses the PyTorch layout and keeps q
on every layer; on square layers the two agree (``tests/test_tat.py``). The activation
transform is the one ``dks`` computes (``dks.base.activation_transform``, leaky-ReLU TAT),
checked against it in the tests; ``pnnh`` does not need ``dks`` at run time.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pnnh.errors import ConfigError

_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm,
          nn.modules.instancenorm._InstanceNorm)


def leaky_relu_cmap(c: float, negative_slope: float) -> float:
    """Local C map of the q-normalised leaky ReLU (see the module docstring)."""
    a = negative_slope
    c = min(max(c, -1.0), 1.0)
    relu_part = (math.sqrt(1 - c * c) + (math.pi - math.acos(c)) * c) / math.pi
    return ((1 - a) ** 2 * relu_part + 2 * a * c) / (1 + a * a)


def chain_c0(negative_slope: float, nonlinear_layers: int) -> float:
    """``C^{∘L}(0)``: the output correlation of a chain of ``L`` layers for orthogonal inputs."""
    c = 0.0
    for _ in range(nonlinear_layers):
        c = leaky_relu_cmap(c, negative_slope)
    return c


def tat_negative_slope(nonlinear_layers: int, eta: float = 0.9, tol: float = 1e-10) -> float:
    """The negative slope ``α`` with ``C^{∘L}(0) = η`` for ``L`` non-linear layers (bisection)."""
    if not 0.0 < eta < 1.0:
        raise ConfigError(f"tat_eta: must be in (0, 1), got {eta!r}", field="tat_eta")
    if nonlinear_layers < 1:
        raise ConfigError("tat: the model has no ReLU to transform", field="tat")
    if chain_c0(0.0, nonlinear_layers) < eta:
        raise ConfigError(
            f"tat_eta: a chain of {nonlinear_layers} ReLU layers reaches C(0) = "
            f"{chain_c0(0.0, nonlinear_layers):.3f} < eta = {eta} even with plain ReLUs; "
            "use a smaller eta or a deeper model", field="tat_eta")
    lo, hi = 0.0, 1.0  # chain_c0 decreases in the slope: >= eta at lo, 0 < eta at hi
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        if chain_c0(mid, nonlinear_layers) > eta:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


class TATLeakyReLU(nn.Module):
    """``sqrt(2 / (1 + α²)) · leaky_relu(x, α)``: the TAT-transformed rectifier."""

    def __init__(self, negative_slope: float):
        super().__init__()
        self.negative_slope = float(negative_slope)
        self.output_scale = math.sqrt(2.0 / (1.0 + self.negative_slope ** 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(x, self.negative_slope) * self.output_scale

    def extra_repr(self) -> str:
        return f"negative_slope={self.negative_slope:.6f}, output_scale={self.output_scale:.6f}"


def suo_(weight: torch.Tensor, delta: bool = True) -> torch.Tensor:
    """Scaled uniform orthogonal init of a PyTorch weight ``[out, in, *kernel]``, in place.

    Delta (``delta=True``, convolutions): zeros except the centre tap, an orthogonal
    ``out x in`` matrix. Otherwise an orthogonal ``out x (in · k...)`` matrix. Either is scaled
    by ``max(sqrt(out / fan_in), 1)`` so that ``E‖Wx‖² / out = ‖x‖² / fan_in`` (q is kept).
    """
    out_dim = weight.shape[0]
    with torch.no_grad():
        if delta and weight.dim() > 2:
            if any(k % 2 == 0 for k in weight.shape[2:]):
                raise ConfigError("tat: Delta initialisation needs odd kernel sizes", field="tat")
            in_dim = weight.shape[1]
            mat = nn.init.orthogonal_(weight.new_empty(out_dim, in_dim))
            weight.zero_()
            centre = (slice(None), slice(None)) + tuple(k // 2 for k in weight.shape[2:])
            weight[centre] = mat * max(math.sqrt(out_dim / in_dim), 1.0)
        else:
            fan_in = weight[0].numel()
            mat = nn.init.orthogonal_(weight.new_empty(out_dim, fan_in))
            weight.copy_(mat.reshape(weight.shape) * max(math.sqrt(out_dim / fan_in), 1.0))
    return weight


class TATNet(nn.Module):
    """A plain net rebuilt with TAT activations: ``stem -> blocks -> head``, each a Sequential."""

    def __init__(self, stem: nn.Sequential, blocks: nn.Sequential, head: nn.Sequential,
                 negative_slope: float, eta: float, nonlinear_layers: int):
        super().__init__()
        self.stem, self.blocks, self.head = stem, blocks, head
        self.negative_slope, self.eta, self.nonlinear_layers = negative_slope, eta, nonlinear_layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


def _plain_part(part: nn.Module | None, what: str) -> list[nn.Module]:
    from pnnh.errors import PnnhError
    from pnnh.export import plain_layers

    if part is None:
        return []
    for m in part.modules():
        if isinstance(m, _NORMS):
            raise ConfigError(f"tat: applies to plain nets without normalization; {what} has "
                              f"{type(m).__name__}", field="tat")
        if hasattr(m, "coder") or type(m).__name__ in ("Coder", "DownsampleCoder"):
            raise ConfigError("tat: a PNNH block's coder needs ReLU (relu(z) - relu(-z) = z); "
                              "TAT applies to plain models", field="tat")
    try:
        return plain_layers([part])
    except PnnhError as e:
        raise ConfigError(f"tat: applies to plain models only ({e})", field="tat") from e


def apply_tat(model: nn.Module, eta: float = 0.9, init: bool = True) -> TATNet:
    """Rebuild a plain ReLU model (``stem``/``blocks``/``head``) with leaky-ReLU TAT.

    Every ``ReLU`` becomes :class:`TATLeakyReLU` with the slope that gives the whole chain
    ``C(0) = eta``; with ``init=True`` every Linear/Conv gets SUO (Delta for convs) weights
    and zero biases. Blocks keep their boundaries (``blocks[i]`` is a Sequential of the block's
    layers). Models with normalization, shortcuts or coders are refused (ConfigError).
    """
    if not all(hasattr(model, k) for k in ("stem", "blocks", "head")):
        raise ConfigError(f"tat: needs a model with stem/blocks/head, got {type(model).__name__}",
                          field="tat")
    stem = _plain_part(model.stem, "the stem")
    blocks = [_plain_part(b, f"block {i}") for i, b in enumerate(model.blocks)]
    head = _plain_part(model.head, "the head")
    parts = [stem, *blocks, head]
    n_relu = sum(isinstance(m, nn.ReLU) for p in parts for m in p)
    slope = tat_negative_slope(n_relu, eta)

    def rebuild(layers: list[nn.Module]) -> nn.Sequential:
        out = []
        for m in layers:
            if isinstance(m, nn.ReLU):
                m = TATLeakyReLU(slope)
            elif init and isinstance(m, _LAYERS):
                suo_(m.weight, delta=True)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            out.append(m)
        return nn.Sequential(*out)

    net = TATNet(rebuild(stem), nn.Sequential(*(rebuild(b) for b in blocks)), rebuild(head),
                 slope, eta, n_relu)
    for k in ("in_shape", "pnnh_name"):
        if hasattr(model, k):
            setattr(net, k, getattr(model, k))
    p = next(model.parameters(), None)
    return net.to(p) if p is not None else net
