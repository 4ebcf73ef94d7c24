"""Eval-mode BatchNorm folded into the layer before it, inside the loss: an exact reparametrization.

In eval mode a BatchNorm is an affine map of its input, per channel ``c``::

    BN(z)_c = γ_c (z_c − μ_c) / √(σ²_c + ε) + β_c = s_c z_c + (β_c − s_c μ_c),   s = γ/√(σ² + ε)

so for ``z = conv(x; W, b)`` (or a linear layer), with ``W_c`` the weights of output channel c::

    BN(conv(x; W, b)) = conv(x; s·W, s·(b − μ) + β)

The right side is the *same function* of ``(W, b, γ, β)``: the loss, its gradient and its
Hessian with respect to every parameter are unchanged (a float64 test checks the dense
Hessians agree to 1e-10). Only the graph changes: the activation-sized BatchNorm ops, whose
double backward is about an eighth of a ResNet-20 Hessian-vector product on the development
CPU, become a few weight-sized ops (``s·W`` is a tensor of the weight's shape).

:func:`foldable_pairs` finds the pairs by running the model once on one sample: a
``(layer, BatchNorm)`` pair qualifies when the layer is a plain ``nn.Conv1d/2d/3d`` or
``nn.Linear`` (exact types: a subclass may change its forward), the BatchNorm a plain
``nn.BatchNorm1d/2d/3d`` in eval mode with running statistics (or timm's norm-act layout: a
BatchNorm subclass with an ``act`` module, and maybe a ``drop`` module, that computes
``act(drop(BN(z)))``, as ``BatchNormAct2d`` does; folded, it computes ``act(drop(z))``), each
is called once, the
BatchNorm's input *is* the layer's output (nothing in between, not even in place), and the
autograd graph shows nothing else reading that output. A final check compares the folded
model's outputs with the original's; on any mismatch nothing is folded. :func:`folded` applies
the pairs for the duration of a ``with`` block by swapping the two modules' ``forward`` (the
weights are read at call time, so ``torch.func.functional_call`` parameters flow through).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn
from torch.func import functional_call

from pnnh.coder import folded_weight_bias

LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _norm_act(m: nn.Module) -> bool:
    """timm's layout (``BatchNormAct2d``): a BatchNorm subclass that applies ``drop`` and ``act``
    after the normalisation. Whether its forward really is that is checked by the outputs."""
    return (isinstance(m, NORMS) and type(m) not in NORMS
            and isinstance(getattr(m, "act", None), nn.Module)
            and isinstance(getattr(m, "drop", nn.Identity()), nn.Module))


def _eval_bn(m: nn.Module) -> bool:
    return ((type(m) in NORMS or _norm_act(m)) and not m.training
            and m.running_mean is not None and m.running_var is not None)


def _tail(bn: nn.Module):
    """What a folded BatchNorm still computes: nothing, or a norm-act module's ``act(drop(·))``."""
    if not _norm_act(bn):
        return _identity
    drop = getattr(bn, "drop", None)

    def forward(inp: torch.Tensor) -> torch.Tensor:
        return bn.act(drop(inp) if drop is not None else inp)
    return forward


def _consumers(roots: Sequence[torch.Tensor]) -> dict:
    """How many edges of the autograd graph (reachable from ``roots``) point at each node; a
    root counts as one more reader of its own node."""
    count: dict = {}
    seen, stack = set(), []
    for t in roots:
        if t.grad_fn is not None:
            count[t.grad_fn] = count.get(t.grad_fn, 0) + 1
            stack.append(t.grad_fn)
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        for nxt, _ in node.next_functions:
            if nxt is not None:
                count[nxt] = count.get(nxt, 0) + 1
                stack.append(nxt)
    return count


def _tensors(out) -> list[torch.Tensor]:
    if torch.is_tensor(out):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _tensors(o)]
    return []


def foldable_pairs(model: nn.Module, x: torch.Tensor,
                   batch_size: int | None = None) -> list[tuple[str, str]]:
    """``(layer name, BatchNorm name)`` pairs that :func:`folded` may fold, found by one forward
    pass of ``x`` (one sample is enough); ``[]`` when the model has no eval-mode BatchNorm.

    With ``batch_size``, only the pairs where folding pays: the layer's output over the batch
    (``batch_size ×`` its elements for ``x``) has at least as many elements as its weight.
    Folding trades the BatchNorm's activation-sized ops for weight-sized ones (``s·W`` in
    float64 and its derivatives), so it is a loss where the weight is the larger: on
    torchvision's ResNet-18 at 8 samples of 3x64x64, folding every pair doubled the time of an
    HVP (0.51 s against 0.28 s unfolded, 1 thread), folding the 7 pairs this rule keeps took
    0.25 s; on ResNet-20 at 32 samples of 3x32x32, where every pair passes, 0.21 s against
    0.27 s (``benchmarks/hessian_real.py`` profiles it)."""
    mods = dict(model.named_modules())
    if not any(_eval_bn(m) for m in mods.values()):
        return []
    seen_out: dict[str, list] = {}
    seen_in: dict[str, list] = {}

    def after(name):
        def hook(_m, _inp, out):
            seen_out.setdefault(name, []).append((out, getattr(out, "grad_fn", None)))
        return hook

    def before(name):
        def hook(_m, inp):
            t = inp[0] if inp else None
            seen_in.setdefault(name, []).append((t, getattr(t, "grad_fn", None)))
        return hook

    handles = [m.register_forward_hook(after(n)) for n, m in mods.items() if type(m) in LAYERS]
    handles += [m.register_forward_pre_hook(before(n)) for n, m in mods.items() if _eval_bn(m)]
    params = {n: p.detach().requires_grad_(True) for n, p in model.named_parameters()}
    try:
        with torch.enable_grad():
            out = functional_call(model, params, (x,))
    finally:
        for h in handles:
            h.remove()
    count = _consumers(_tensors(out))
    by_node = {calls[0][1]: name for name, calls in seen_out.items()
               if len(calls) == 1 and calls[0][1] is not None}
    pairs = []
    for bn_name, calls in seen_in.items():
        if len(calls) != 1 or calls[0][1] not in by_node:
            continue
        node = calls[0][1]
        layer_name = by_node[node]
        layer_out = seen_out[layer_name][0][0]
        bn = mods[bn_name]
        pays = batch_size is None or (
            batch_size * layer_out[:1].numel() >= mods[layer_name].weight.numel())
        if (calls[0][0] is layer_out and count.get(node, 0) == 1 and pays
                and layer_out.shape[1] == bn.num_features
                and (type(mods[layer_name]) is not nn.Linear or layer_out.dim() == 2)):
            pairs.append((layer_name, bn_name))
    if pairs and not _same_outputs(model, pairs, x, [t.detach() for t in _tensors(out)]):
        return []
    return pairs


def _same_outputs(model: nn.Module, pairs: Sequence[tuple[str, str]], x: torch.Tensor,
                  ref: list[torch.Tensor]) -> bool:
    """Whether the folded model gives the outputs ``ref`` of the model as it is."""
    with torch.no_grad(), folded(model, pairs):
        new = _tensors(model(x))
    return len(ref) == len(new) and all(
        a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-5 * (1 + float(a.abs().max())))
        for a, b in zip(ref, new) if a.is_floating_point())


def _fold_forward(layer: nn.Module, bn: nn.Module):
    """The layer's forward with ``bn`` folded into it (:func:`pnnh.coder.folded_weight_bias`),
    reading every tensor at call time. The folded weight and bias are computed in float64
    (weight-sized work) and cast back: in float32 the product ``s·W`` cost a tenth of λmax's
    accuracy on ResNet-20 (see docs/BENCHMARKS.md)."""
    def forward(inp: torch.Tensor) -> torch.Tensor:
        w, b = folded_weight_bias(layer.weight, layer.bias, bn, dtype=torch.float64)
        if type(layer) is nn.Linear:
            return nn.functional.linear(inp, w, b)
        return layer._conv_forward(inp, w, b)
    return forward


def _identity(inp: torch.Tensor) -> torch.Tensor:
    return inp


@contextlib.contextmanager
def folded(model: nn.Module, pairs: Sequence[tuple[str, str]]) -> Iterator[None]:
    """Within the block, each pair's layer computes ``BN(layer(x))`` in one op and the
    BatchNorm passes its input through, or a norm-act module applies only its activation (the
    modules' ``forward`` are swapped, then restored)."""
    mods = dict(model.named_modules()) if pairs else {}
    swapped = []
    try:
        for layer_name, bn_name in pairs:
            layer, bn = mods[layer_name], mods[bn_name]
            layer.forward = _fold_forward(layer, bn)
            bn.forward = _tail(bn)
            swapped += [layer, bn]
        yield
    finally:
        for m in swapped:
            m.__dict__.pop("forward", None)
