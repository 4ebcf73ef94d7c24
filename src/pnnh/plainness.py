"""Proof of plainness: find residual connections and gates in a model's captured graph
(``torch.fx``, or ``torch.export`` where fx cannot trace: :mod:`pnnh.capture`).

A network is *plain* when it is one straight chain of layers: every tensor that two branches
combine has crossed the same number of weight layers on both since they forked. Formally,
for each *merge* (an op with two or more inputs that carry data: ``add``, ``cat``, ``mul``,
``q @ kᵀ``, ...) and each pair of its inputs ``a``, ``b``, let ``s`` be a tensor both depend on
and ``D(s → a)`` the largest number of weight layers on a data-flow path from ``s`` to
``a``.
The merge is a **residual connection** from the fork ``s`` when

    D(s → a) ≠ D(s → b)

for some common ancestor ``s``; the one reported is the latest such ``s`` (the fork nearest
the merge), so each residual connection is listed once, by ``(block, source, sink)``.

Stages are counted in weight layers, and a difference is excused in one case only: when
both branches cross the same number (one or more) of non-linearities, the extra layers are
linear maps between the same non-linearities and compose into one wider layer (a PNNH
transition's carried units ``pad(relu(P x)) - pad(relu(-P x))`` beside ``D relu(E x)``
are the plain ``[I, -I, D] relu([P; -P; E] x)``). Non-linearities are the activation modules
and functions, softmax and ``MultiheadAttention``; normalizations are not counted.

A *weight layer* is a call of a parametrised mixing module (``Linear``, ``Conv*``,
``MultiheadAttention``, RNNs, ...) or a matmul-like function (``F.linear``, ``F.conv*``,
``matmul``, ``einsum``, ...) applied with a weight that does not depend on the input (a
parameter, or a tensor computed from parameters only, such as the PNNH coder's ``[A; -A]``).
Normalization modules (BatchNorm, LayerNorm, GroupNorm, ...) are per-channel affine maps and
are *not* weight layers: ``x + BN(f(x))`` and ``LN(x) + f(x)`` are both skips.

The merge's op says what kind of connection it is: an additive merge (``add``, ``sub``,
``cat``, ...) is a **residual connection**, ``kind="identity"`` (no weight layer on the short
side) or ``"projection"`` (weight layers on both sides); a multiplicative merge (``mul``,
``div``) is a **gate**, ``kind="gate"``. Both make a model not plain; :func:`count_skips`
and :attr:`PlainnessReport.counts` count them apart (``residual`` = identity + projection).

Consequences, stated plainly:

- an identity shortcut ``x + f(x)`` and a projection shortcut ``conv1x1(x) + f(x)`` (one layer
  against two) are residual connections; so is DenseNet-style ``cat([x, f(x)])`` (kind
  identity/projection: concatenation carries ``x`` unchanged beside ``f(x)``, as a sum does,
  and is reported once per (merge, fork), so a dense block lists every earlier layer it
  concatenates);
- squeeze-excitation ``x * sigmoid(W₂ relu(W₁ pool(x)))`` (MobileNetV3's ``hardsigmoid``,
  EfficientNet) is a gate, 0 layers against 2; so is a GLU-style ``act(W₁x) * W₃x`` only when
  its sides differ in depth — with one layer on each side it is plain, as attention
  (``softmax(q kᵀ) v``: q, k and v each one projection away from the block input) and the PNNH
  block in its plain form ``[Aᵀ, -Aᵀ, D] relu([A; -A; E] x)`` (two layers on every path) are;
- normalizations written out are plain: RMSNorm's ``x * rsqrt(mean(x²))`` merges two paths
  with no weight layer on either, and ``weight * x`` has one input that carries data;
- the PNNH training form ``AᵀA x + D relu(E x)`` (the exact reparametrization ``AᵀA = I`` of
  the plain form) has a one-layer path beside a two-layer one and is reported: it is the
  plain network's arithmetic, not a plain network;
- only data flow counts: shapes (``x.shape[0]``), ``zeros_like(x)`` and the ``other`` of
  ``y.view_as(other)`` carry no values, and nodes whose value holds no tensor end a path;
- the data flow is the *signal*: float inputs, weight layers applied to what depends on the
  input without being signal (an embedding of token ids), and every float tensor computed
  from the signal. Integer and boolean tensors (token ids, attention masks, positions) are
  not signal, and neither is a float tensor computed from them by no weight layer (the
  additive mask ``(1 - mask) * -inf`` a transformer adds to its scores in every layer): to
  the signal they are constants, like parameters. (So an input turned to float inside the
  forward, ``ids.float()``, starts the signal at its first weight layer.)

Capture (:func:`pnnh.capture.capture`): torch.fx first. A sub-module fx cannot trace, or a
model whose root it cannot trace (``range(x.shape[0])``, ``len(x)``, every Hugging Face
model), is captured again with ``torch.export`` (non-strict), which sees through Python control
flow on shapes, and the same rules run on its ATen graph (``aten.linear``/``convolution``/
``matmul``/``embedding``/... with a constant operand are weight layers, ``aten.relu``/
``gelu``/``silu``/``_softmax``/``scaled_dot_product_attention``/... non-linearities,
``aten.layer_norm``/``batch_norm``/... neither; parameters and buffers are ``get_attr``
nodes, so constant). Every :class:`Skip` says which capture saw it (``capture="fx"`` or
``"export"``). What neither capture sees (control flow on tensor *values*: ``if x.sum() > 0``)
is reported with ``kind="unverified"``: a sub-module fx kept as one op when torch.export
fails on the whole model, or the whole model (``block="(model)"``, ``capture="none"``) when
neither sees it at all; the model is then not proven plain. ``nn.TransformerEncoder`` /
``nn.TransformerEncoderLayer`` (whose fast-path checks do not trace) are traced by fx through
their reference (slow-path) computation, the same function. ``nn.MultiheadAttention`` is one
weight layer to fx.

Each connection is attributed to the *block* (see :func:`find_blocks`) in which its merge
happens; a merge outside every block names the blocks its long path crosses.

Block discovery (:func:`find_blocks`) is shared by the checker and every probe (which import it
through :mod:`pnnh.probes.common`). It tries these layouts in order and takes the first that matches:

1. ``blocks`` (pnnh, timm ViT/MLP-Mixer): its children; a child that is an
   ``nn.Sequential``/``nn.ModuleList`` of composite modules is a stage and is flattened, block
   by block (an ``nn.Sequential`` of leaf layers is one block);
2. ``stages.*.blocks`` (timm ConvNeXt, ByobNet, ...): the blocks of each stage, in order;
3. ``layer1``, ``layer2``, ... (torchvision ResNet/ResNeXt): the children of each;
4. ``encoder.layer`` (Hugging Face BERT/ViT), ``h`` (GPT-2), ``layers`` (Llama, ...):
   searched at any depth, outermost first (``transformer.h``, ``model.layers`` match);
5. ``nn.TransformerEncoder``/``nn.TransformerDecoder`` anywhere: its ``layers``;
6. any other repeated layer stack: the longest ``nn.ModuleList`` of two or more composite
   modules of one class (T5's ``encoder.block``, a user's ``self.stack``), at any depth;
7. the longest ``nn.Sequential``/``nn.ModuleList`` of at least 4 modules (the model itself
   when it is one): its children (VGG's ``features``).

When nothing matches, :class:`~pnnh.errors.ConfigError` lists, in one line, the candidate
module names a user can pass instead.
"""

from __future__ import annotations

import operator
import re
import warnings
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from pnnh.capture import Capture, CaptureError, aten_name
from pnnh.capture import capture as capture_graph
from pnnh.errors import ConfigError

__all__ = ["Skip", "find_skips", "check_plainness", "PlainnessReport", "assert_plain",
           "block_names", "count_skips", "NotPlainError", "RESIDUAL_KINDS"]


@dataclass(frozen=True)
class Skip:
    """One connection that makes a model not plain: ``source`` reaches the merge ``sink`` along
    two paths that cross different numbers of weight layers (``layers``: the counts, short
    side first).

    ``source`` and ``sink`` are graph node names; ``path`` lists the ops of the short side
    (e.g. ``['downsample.0 (Conv2d)', 'downsample.1 (BatchNorm2d)']``); ``kind`` is
    ``"identity"`` (an additive merge, ``add``/``cat``/..., with no weight layer on the short
    side), ``"projection"`` (additive, weight layers on both sides), ``"gate"`` (a
    multiplicative merge, ``x * g(x)`` or ``x / g(x)``: squeeze-excitation, a GLU whose two
    sides differ in depth) or ``"unverified"`` (``block`` could not be captured;
    ``source``/``sink`` empty). ``capture`` is the graph capture that saw it: ``"fx"``,
    ``"export"`` (``torch.export``, where fx could not trace the model) or ``"none"``.
    """

    block: str
    source: str
    sink: str
    path: tuple[str, ...]
    shape: tuple[int, ...] | None = None
    kind: str = "identity"
    layers: tuple[int, int] | None = None
    capture: str = "fx"

    @property
    def residual(self) -> bool:
        """An additive residual connection (``identity`` or ``projection``)."""
        return self.kind in RESIDUAL_KINDS

    def __str__(self) -> str:
        if self.kind == "unverified":
            seen = ("torch.fx cannot trace it" if self.capture == "fx"
                    else "neither torch.fx nor torch.export can capture it")
            return f"{self.block}: unverified ({seen})"
        via = " -> ".join(self.path) if self.path else "(directly)"
        shape = f" {list(self.shape)}" if self.shape is not None else ""
        counts = f", {self.layers[0]} vs {self.layers[1]} layers" if self.layers else ""
        how = "" if self.capture == "fx" else f"; {self.capture}"
        return (f"{self.block}: {self.source}{shape} -> {via} -> {self.sink} "
                f"({self.kind}{counts}{how})")


RESIDUAL_KINDS = ("identity", "projection")


def count_skips(skips: list[Skip]) -> dict[str, int]:
    """``{"residual": n, "gate": n, "unverified": n}``: additive residual connections
    (identity + projection), multiplicative gates, and parts no capture could see."""
    return {"residual": sum(s.residual for s in skips),
            "gate": sum(s.kind == "gate" for s in skips),
            "unverified": sum(s.kind == "unverified" for s in skips)}


class NotPlainError(AssertionError):
    """Raised by :func:`assert_plain` when a model has skip connections."""


_NORMS: tuple[type, ...] = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())

_MIXING_FUNCTIONS = {
    F.linear,
    F.bilinear,
    F.conv1d,
    F.conv2d,
    F.conv3d,
    F.conv_transpose1d,
    F.conv_transpose2d,
    F.conv_transpose3d,
    torch.matmul,
    torch.mm,
    torch.bmm,
    torch.einsum,
    torch.addmm,
    torch.baddbmm,
    torch.tensordot,
    operator.matmul,
}
_MIXING_METHODS = {"matmul", "mm", "bmm", "__matmul__", "__rmatmul__", "addmm", "baddbmm"}
# Ops whose output carries no values of their tensor arguments (only their shape/dtype).
_VALUELESS_FUNCTIONS = {
    torch.zeros_like,
    torch.ones_like,
    torch.empty_like,
    torch.full_like,
    torch.rand_like,
    torch.randn_like,
    torch.randint_like,
}
_VALUELESS_METHODS = {"new_zeros", "new_ones", "new_empty", "new_full", "size", "dim", "numel"}
# Non-linearities: the stage boundaries of a chain (normalizations are not counted).
_NONLINEAR_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU,
    nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid,
    nn.Softplus, nn.Softsign, nn.Softmax, nn.LogSoftmax, nn.GLU, nn.MultiheadAttention,
)
_NONLINEAR_FUNCTIONS = {
    torch.relu, F.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish,
    torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.hardtanh, F.hardswish, F.hardsigmoid,
    F.softplus, F.softsign, torch.softmax, F.softmax, F.log_softmax, F.glu, torch.clamp,
    torch.clamp_min,
}
_NONLINEAR_METHODS = {"relu", "sigmoid", "tanh", "softmax", "log_softmax", "clamp", "clamp_min"}
# Multiplicative merges: two branches combined this way are a gate, not a residual sum.
_PRODUCT_FUNCTIONS = {operator.mul, operator.imul, operator.truediv, operator.itruediv,
                      torch.mul, torch.div, torch.multiply, torch.true_divide}
_PRODUCT_METHODS = {"mul", "mul_", "div", "div_", "multiply", "true_divide", "__mul__",
                    "__rmul__", "__truediv__"}
# The same notions for torch.export's ATen graphs, by op name (pnnh.capture.aten_name).
_ATEN_MIXING = {
    "linear", "addmm", "mm", "bmm", "matmul", "baddbmm", "addbmm", "addmv", "mv", "einsum",
    "tensordot", "bilinear", "convolution", "_convolution", "conv1d", "conv2d", "conv3d",
    "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "embedding", "embedding_bag",
}
_ATEN_NONLINEAR = {
    "relu", "relu6", "leaky_relu", "prelu", "_prelu_kernel", "rrelu", "rrelu_with_noise", "elu",
    "selu", "celu", "gelu", "silu", "mish", "sigmoid", "log_sigmoid", "tanh", "hardtanh",
    "hardswish", "hardsigmoid", "softplus", "_softmax", "softmax", "_log_softmax",
    "log_softmax", "glu", "clamp", "clamp_min", "clamp_max", "threshold",
    "scaled_dot_product_attention", "_scaled_dot_product_attention_math",
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
}
_ATEN_VALUELESS = {
    "zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like",
    "randint_like", "new_zeros", "new_ones", "new_empty", "new_full", "sym_size", "sym_numel",
    "sym_stride", "size", "_assert_tensor_metadata",
}
_ATEN_PRODUCT = {"mul", "div"}


# ----------------------------------------------------------------------------- blocks
_CONTAINERS = (nn.Sequential, nn.ModuleList)
_NAMED_STACKS = ("encoder.layer", "h", "layers")
MIN_SEQUENTIAL = 4


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module behind DDP (``.module``) and ``torch.compile`` (``._orig_mod``)."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def _flatten(prefix: str, module: nn.Module) -> list[tuple[str, nn.Module]]:
    out = []
    for name, child in module.named_children():
        qual = f"{prefix}.{name}" if prefix else name
        if isinstance(child, _CONTAINERS) and all(list(c.children()) for c in child.children()):
            out += _flatten(qual, child)  # a stage of blocks
        else:
            out.append((qual, child))
    return out


def _stacks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Each layout's containers, in the documented order (the first non-empty one wins)."""
    named = [(n, m) for n, m in model.named_modules() if n]
    children = {n for n, m in named if isinstance(m, nn.Module) and list(m.children())}
    blocks = [(n, m) for n, m in named if n == "blocks" and n in children]
    if blocks:
        return blocks
    stages = [(n, m) for n, m in named if re.fullmatch(r"stages\.\d+\.blocks", n) and n in children]
    if stages:
        return stages
    tv = sorted(((n, m) for n, m in named if re.fullmatch(r"layer\d+", n) and n in children),
                key=lambda t: int(t[0][5:]))
    if tv:
        return tv
    for suffix in _NAMED_STACKS:
        hits = [(n, m) for n, m in named if (n == suffix or n.endswith("." + suffix))
                and isinstance(m, _CONTAINERS) and len(m) > 0]
        if hits:
            return hits[:1]
    for n, m in named:
        if isinstance(m, (nn.TransformerEncoder, nn.TransformerDecoder)):
            return [(f"{n}.layers", m.layers)]
    repeated = [(n, m) for n, m in named if isinstance(m, nn.ModuleList) and len(m) >= 2
                and len({type(c) for c in m}) == 1 and all(list(c.children()) for c in m)]
    if repeated:  # any other architecture's layer stack: T5's `block`, a user's `stack`, ...
        return [max(repeated, key=lambda t: len(t[1]))]
    seqs = [(n, m) for n, m in [("", model)] + named
            if isinstance(m, _CONTAINERS) and len(m) >= MIN_SEQUENTIAL]
    if seqs:
        return [max(seqs, key=lambda t: len(t[1]))]
    return []


def find_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(qualified name, module)`` of the model's blocks, in order (see the module docstring
    for the layouts tried). Raises :class:`ConfigError` naming candidate modules if none."""
    model = unwrap(model)
    out: list[tuple[str, nn.Module]] = []
    for name, container in _stacks(model):
        out += _flatten(name, container)
    if out:
        return out
    candidates = [n for n, m in model.named_modules() if n and list(m.children())]
    candidates = candidates or [n for n, _ in model.named_children()]
    shown = ", ".join(candidates[:20]) + (" ..." if len(candidates) > 20 else "")
    raise ConfigError(
        f"no blocks found in {type(model).__name__} (looked for blocks, stages.*.blocks, "
        f"layer1.., encoder.layer, h, layers, TransformerEncoder.layers, a ModuleList of "
        f"same-class blocks, a Sequential of "
        f">= {MIN_SEQUENTIAL} modules); name the modules to probe, e.g. from: {shown or '(none)'}",
        field="blocks",
    )


# ----------------------------------------------------------------------------- the checker
def block_names(model: nn.Module) -> list[str]:
    """Qualified names of the units skips are attributed to: the blocks
    :func:`find_blocks` finds, then the model's top-level children that hold none of them
    (``stem``, ``head``, ...); without blocks, the top-level children."""
    try:
        blocks = [name for name, _ in find_blocks(model)]
    except Exception:
        blocks = []
    names = list(blocks)
    for name, _ in model.named_children():
        if not any(b == name or b.startswith(name + ".") for b in blocks):
            names.append(name)
    return names


def _has_signal(value) -> bool:
    """Whether ``value`` holds a floating-point (or complex) tensor: activations. Integer and
    boolean tensors (token ids, masks, indices) carry no residual signal: an embedding of
    token ids starts the data flow, and a mask computed from the ids is a constant to it."""
    if isinstance(value, torch.Tensor):
        return value.is_floating_point() or value.is_complex()
    if isinstance(value, (list, tuple)):
        return any(_has_signal(v) for v in value)
    if isinstance(value, dict):
        return any(_has_signal(v) for v in value.values())
    return False


def _carriers(node: fx.Node) -> list[fx.Node]:
    """Input nodes of ``node`` whose *values* flow into its output."""
    if node.op == "call_function" and node.target in _VALUELESS_FUNCTIONS:
        return []
    aten = aten_name(node)
    if aten in _ATEN_VALUELESS:
        return []
    if node.op == "call_method":
        if node.target in _VALUELESS_METHODS:
            return []
    if (node.op == "call_method" and (node.target.endswith("_as") or node.target in ("to", "type"))
            or aten is not None and aten.endswith("_as")):
        first = node.args[0] if node.args else None
        return [first] if isinstance(first, fx.Node) else []
    return list(node.all_input_nodes)


def _module_path(node: fx.Node) -> str:
    """The innermost module whose call produced ``node`` (``""``: the model itself)."""
    stack = list((node.meta.get("nn_module_stack") or {}).values())
    return stack[-1][0] if stack else ""


def _op_label(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return f"{node.target} ({type(modules[node.target]).__name__})"
    if node.op == "call_method":
        return f".{node.target}()"
    if node.op == "output":
        return "output"
    aten = aten_name(node)
    if aten is not None:  # torch.export: the ATen op, in the module that called it
        return f"{_module_path(node) or '(model)'}: {node.name}"
    return node.name


def _record_values(gm: fx.GraphModule, model: nn.Module, inputs: tuple) -> dict:
    """Run the captured graph once (eval mode, no grad; the mode is restored): node -> value."""
    values: dict[fx.Node, object] = {}

    class _Recorder(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            values[n] = out
            return out

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            _Recorder(gm).run(*inputs)
    finally:
        model.train(was_training)
    return values


class _Graph:
    """The data-flow view of a captured model (an fx trace, or torch.export's ATen graph):
    live nodes, their carriers, weight layers, non-linearities and products."""

    def __init__(self, graph: fx.Graph, modules: dict[str, nn.Module], values: dict):
        self.nodes = list(graph.nodes)
        self.order = {n: i for i, n in enumerate(self.nodes)}
        self.modules = modules
        self.values = values
        signal_nodes = {n for n, v in values.items() if _has_signal(v)}
        # Nodes that depend on the input; the others are constants (parameters, buffers and
        # what is computed from them only, e.g. a coder's [A; -A]; in an exported graph these
        # are get_attr nodes, and the placeholders are the user's inputs).
        self.dependent: set[fx.Node] = set()
        for n in self.nodes:
            if n.op == "placeholder" or any(a in self.dependent for a in _carriers(n)):
                self.dependent.add(n)
        self.layer = {n: int(self._is_weight_layer(n)) for n in self.nodes}
        # The signal: float inputs, and weight layers applied to what depends on the input
        # without being signal (an embedding of token ids); then every float tensor computed
        # from the signal. A float tensor that depends on the input only through integer or
        # boolean tensors and no weight layer (a mask, positions from the ids) is side
        # information, a constant to the signal.
        self.live: set[fx.Node] = set()
        for n in self.nodes:
            if n in self.dependent and n in signal_nodes and (
                    n.op == "placeholder" or self.layer[n]
                    or any(a in self.live for a in _carriers(n))):
                self.live.add(n)
        self.inputs = {n: list(dict.fromkeys(a for a in _carriers(n) if a in self.live))
                       for n in self.nodes}
        self.nonlinear = {n: int(self._is_nonlinear(n)) for n in self.nodes}

    def _is_nonlinear(self, n: fx.Node) -> bool:
        if n.op == "call_module":
            return isinstance(self.modules[n.target], _NONLINEAR_MODULES)
        if n.op == "call_function":
            return n.target in _NONLINEAR_FUNCTIONS or aten_name(n) in _ATEN_NONLINEAR
        return n.op == "call_method" and n.target in _NONLINEAR_METHODS

    def _is_weight_layer(self, n: fx.Node) -> bool:
        if n.op == "call_module":
            m = self.modules[n.target]
            has_state = any(True for _ in m.parameters()) or any(True for _ in m.buffers())
            return has_state and not isinstance(m, _NORMS)
        has_const = any(a not in self.dependent for a in n.all_input_nodes)
        if n.op == "call_function" and (n.target in _MIXING_FUNCTIONS
                                        or aten_name(n) in _ATEN_MIXING):
            return has_const
        if n.op == "call_method" and n.target in _MIXING_METHODS:
            return has_const
        return False

    def is_product(self, n: fx.Node) -> bool:
        """A multiplicative merge (``x * g``, ``x / g``): where two branches meet it is a gate."""
        if n.op == "call_function":
            return n.target in _PRODUCT_FUNCTIONS or aten_name(n) in _ATEN_PRODUCT
        return n.op == "call_method" and n.target in _PRODUCT_METHODS

    def layer_counts(self, target: fx.Node, weight: dict | None = None) -> dict[fx.Node, frozenset[int]]:
        """For every live ancestor ``s`` of ``target`` (and ``target`` itself): the weight-layer
        counts (or, with ``weight=self.nonlinear``, the non-linearity counts) along the paths
        ``s -> target``, ``s`` excluded and ``target`` included."""
        weight = self.layer if weight is None else weight
        ancestors, work = {target}, [target]
        while work:
            for a in self.inputs[work.pop()]:
                if a not in ancestors:
                    ancestors.add(a)
                    work.append(a)
        counts: dict[fx.Node, frozenset[int]] = {target: frozenset([0])}
        for n in sorted(ancestors - {target}, key=self.order.__getitem__, reverse=True):
            acc: set[int] = set()
            for u in n.users:
                if u in counts and n in self.inputs[u]:
                    acc.update(c + weight[u] for c in counts[u])
            counts[n] = frozenset(acc)
        return counts

    def short_path(self, src: fx.Node, dst: fx.Node, short: int, weight: dict) -> list[fx.Node]:
        """Ops strictly between ``src`` and ``dst`` on a path of ``short`` (by ``weight``)."""
        counts = self.layer_counts(dst, weight)
        path, n, left = [], src, short
        while n is not dst:
            n = next(u for u in sorted(n.users, key=self.order.__getitem__)
                     if u in counts and n in self.inputs[u] and left - weight[u] in counts[u])
            left -= weight[n]
            if n is not dst:
                path.append(n)
        return path


def _is_residual(layers: tuple[int, int], nonlinear: tuple[int, int]) -> bool:
    """Two branches from one fork are a residual connection when they cross different numbers
    of weight layers, unless they cross the same number (one or more) of non-linearities: then
    the extra layers are linear maps between the same non-linearities and compose into one
    wider layer (``pad(relu(P x)) + D relu(E x)`` is ``[I, D] relu([P; E] x)``)."""
    if layers[0] == layers[1]:
        return False
    return not (nonlinear[0] == nonlinear[1] >= 1)


def _fork(g: _Graph, a: fx.Node, b: fx.Node, ca: tuple[dict, dict], cb: tuple[dict, dict]):
    """The latest common ancestor of merge inputs ``a`` and ``b`` whose longest paths to them
    make a residual connection (:func:`_is_residual`); None if there is none. (Longest: inside
    attention ``softmax(q kᵀ) v`` the paths through v and through the softmax differ, and
    the block's depth is the longer one.)"""
    (la, na), (lb, nb) = ca, cb
    for s in sorted(set(la) & set(lb), key=g.order.__getitem__, reverse=True):
        if _is_residual((max(la[s]), max(lb[s])), (max(na[s]), max(nb[s]))):
            return s
    return None


def _unit_of(node: fx.Node, units: list[str]) -> str | None:
    """The outermost unit (block, stem, head) whose call produced ``node``."""
    stack = [v[0] for v in (node.meta.get("nn_module_stack") or {}).values()]
    if node.op == "call_module":
        stack.append(node.target)
    for path in stack:
        if path in units:
            return path
    return None


def _attribute(g: _Graph, merge: fx.Node, long_path: list[fx.Node], units: list[str]) -> str:
    unit = _unit_of(merge, units)
    if unit is not None:
        return unit
    crossed = list(dict.fromkeys(u for u in (_unit_of(n, units) for n in long_path) if u))
    if len(crossed) > 1:
        return f"{crossed[0]}..{crossed[-1]}"
    return crossed[0] if crossed else "(model)"


def _merge_skips(g: _Graph, merge: fx.Node, units: list[str], how: str) -> list[Skip]:
    """Every residual connection or gate closing at ``merge`` (one per distinct fork)."""
    ins = g.inputs[merge]
    counts = {i: (g.layer_counts(i), g.layer_counts(i, g.nonlinear)) for i in ins}
    found: dict[fx.Node, Skip] = {}
    for j, a in enumerate(ins):
        for b in ins[j + 1:]:
            src = _fork(g, a, b, counts[a], counts[b])
            if src is None or src in found:
                continue
            (short_in, ls), (long_in, ll) = sorted(
                [(a, max(counts[a][0][src])), (b, max(counts[b][0][src]))], key=lambda t: t[1])
            path = [] if src is short_in else g.short_path(src, short_in, ls, g.layer) + [short_in]
            long_path = g.short_path(src, long_in, ll, g.layer) + [long_in]
            v = g.values.get(src)
            kind = "gate" if g.is_product(merge) else "identity" if ls == 0 else "projection"
            found[src] = Skip(
                _attribute(g, merge, long_path, units), src.name, _op_label(merge, g.modules),
                tuple(_op_label(n, g.modules) for n in path),
                tuple(v.shape) if isinstance(v, torch.Tensor) else None, kind, (ls, ll), how,
            )
    return list(found.values())


@dataclass(frozen=True)
class PlainnessReport:
    """What :func:`check_plainness` found: ``skips`` (see :func:`find_skips`), the capture
    that produced the graph (``"fx"``, ``"export"`` or ``"none"``) and ``note``, why an
    earlier capture was not used (empty when torch.fx saw the whole model)."""

    skips: tuple[Skip, ...]
    capture: str
    note: str = ""

    @property
    def counts(self) -> dict[str, int]:
        """:func:`count_skips` of ``skips``: residual connections, gates, unverified parts."""
        return count_skips(list(self.skips))

    @property
    def plain(self) -> bool:
        return not self.skips

    def summary(self) -> str:
        """One line: ``"2 residual connection(s), 1 gate(s) [torch.export]"`` or ``"plain [...]"``."""
        c = self.counts
        parts = [f"{c['residual']} residual connection(s)"] if c["residual"] else []
        parts += [f"{c['gate']} gate(s)"] if c["gate"] else []
        parts += [f"{c['unverified']} unverified"] if c["unverified"] else []
        how = {"fx": "torch.fx", "export": "torch.export", "none": "no capture"}[self.capture]
        return f"{', '.join(parts) or 'plain'} [{how}]"


def check_plainness(model: nn.Module, example_input, capture: str = "auto") -> PlainnessReport:
    """Capture ``model``'s graph (:func:`pnnh.capture.capture`: torch.fx, else torch.export)
    and list every residual connection and gate in it, one per (merge, fork), in execution
    order, then every part no capture could see (``kind="unverified"``). No skip means the
    model is proven plain.

    ``example_input`` is a batch: a tensor, a tuple of positional inputs, or a dict of keyword
    inputs (``{"input_ids": ids, "attention_mask": mask}``); integer token ids are fine. The
    model is run once on it, in eval mode and without gradients (its mode is restored), to
    tell tensor values from shapes. The forward may return a tensor, a tuple, a dict or a
    Hugging Face ``ModelOutput``. ``capture="fx"`` or ``"export"`` uses
    that capture only (``"auto"``: torch.fx, and torch.export where fx cannot see everything).
    """
    inputs = example_input if isinstance(example_input, (tuple, dict)) else (example_input,)
    try:
        cap: Capture = capture_graph(model, inputs, capture)
    except CaptureError as e:
        warnings.warn(f"plainness: {type(model).__name__} reported as unverified: {e}",
                      stacklevel=3)
        return PlainnessReport((Skip("(model)", "", "", (), kind="unverified",
                                     capture="none"),), "none", str(e))
    if cap.opaque:
        warnings.warn("plainness: not traceable, reported as unverified: "
                      + ", ".join(cap.opaque) + f" ({cap.note})", stacklevel=3)
    g = _Graph(cap.gm.graph, dict(cap.gm.named_modules()), _record_values(cap.gm, model, cap.args))
    units = block_names(model)
    skips: list[Skip] = []
    for n in g.nodes:
        if n.op != "output" and n in g.live and len(g.inputs[n]) >= 2:
            skips += _merge_skips(g, n, units, cap.method)
    skips += [Skip(name, "", "", (), kind="unverified", capture=cap.method)
              for name in cap.opaque]
    return PlainnessReport(tuple(skips), cap.method, cap.note)


def find_skips(model: nn.Module, example_input, capture: str = "auto") -> list[Skip]:
    """Every residual connection (``kind`` ``identity``/``projection``) and gate (``gate``) in
    ``model``, then every part that could not be captured (``unverified``); an empty list means
    the model is proven plain. :func:`check_plainness` with the capture that ran."""
    return list(check_plainness(model, example_input, capture).skips)


def assert_plain(model: nn.Module, example_input) -> None:
    """Raise :class:`NotPlainError` listing every skip (residual connection, gate, unverified
    part) if ``model`` is not proven plain."""
    report = check_plainness(model, example_input)
    if report.skips:
        name = getattr(model, "pnnh_name", type(model).__name__)
        lines = "\n  ".join(str(s) for s in report.skips)
        raise NotPlainError(f"{name} is not plain: {len(report.skips)} skip(s), "
                            f"{report.summary()}\n  {lines}")
