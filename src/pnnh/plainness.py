"""Proof of plainness: find skip connections in a model by tracing it with ``torch.fx``.

A network is *plain* when it is one straight chain of layers: nothing computed before a block
is kept alive and combined with what comes after it. Formally, for every block ``B``:

    no tensor produced before ``B`` reaches a tensor after ``B`` along a path that avoids
    ``B``'s own weight layers.

A *path* follows the data flow of the traced graph (``torch.fx``), one op at a time. It may
pass through parameter-free ops of the block (``add``, ``cat``, ``relu``, reshapes, dropout,
normalization) — that is exactly what an identity shortcut ``x + f(x)`` or a DenseNet-style
``cat([x, f(x)])`` does — and it may go around the block altogether. It is stopped only by a
**weight layer of the block**: a call of a parametrised mixing module (``Linear``, ``Conv*``,
``MultiheadAttention``, RNNs, ...) or a matmul-like function (``F.linear``, ``F.conv*``,
``matmul``, ``einsum``, ...) applied with a weight that does not depend on the input (a
parameter, or a tensor computed from parameters only, such as the PNNH coder's ``[A; -A]``).
Normalization modules (BatchNorm, LayerNorm, GroupNorm, ...) are per-channel affine maps and do
*not* stop a path: ``x + BN(f(x))`` and ``LN(x) + f(x)`` are both skips.

Consequences, stated plainly:

- attention (``softmax(q kᵀ) v``) merges branches of the same input, but every branch has gone
  through the block's q/k/v projections, so attention is plain;
- the PNNH coder (the block input crossing the non-linearity through the shared ``[A; -A]``
  and ``[Aᵀ, -Aᵀ]`` layers) is plain: its path goes through the block's layers;
- a *projection* shortcut (``conv1x1(x) + f(x)``) goes through a layer of the block and is not
  reported; identity shortcuts, zero-padded (option-A) shortcuts and any parameter-free path are;
- only data flow counts: shapes (``x.shape[0]``), ``zeros_like(x)`` and the ``other`` of
  ``y.view_as(other)`` carry no values, and nodes whose value holds no tensor end a path.

Blocks are the children of ``model.blocks`` (nested ``nn.Sequential``/``nn.ModuleList`` are
flattened, so stages of blocks count block by block) and the model's other top-level children
(``stem``, ``head``, ...); a model without ``blocks`` uses its top-level children.
"""

from __future__ import annotations

import operator
import warnings
from collections import deque
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

__all__ = ["Skip", "find_skips", "assert_plain", "block_names", "NotPlainError"]


@dataclass(frozen=True)
class Skip:
    """A tensor from before ``block`` that reaches after it without crossing its weight layers.

    ``source`` and ``sink`` are ``torch.fx`` node names; ``path`` lists the ops in between
    (the ops of the skip: e.g. ``['add', 'relu']`` for ``relu(x + f(x))``).
    """

    block: str
    source: str
    sink: str
    path: tuple[str, ...]
    shape: tuple[int, ...] | None = None

    def __str__(self) -> str:
        via = " -> ".join(self.path) if self.path else "(directly)"
        shape = f" {list(self.shape)}" if self.shape is not None else ""
        return f"{self.block}: {self.source}{shape} -> {via} -> {self.sink}"


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


class _Tracer(fx.Tracer):
    """torch.nn modules are leaves only when they have no sub-modules (containers and composite
    torch.nn modules such as ``TransformerEncoderLayer`` are traced through, so their skips show);
    ``MultiheadAttention`` and parametrized modules stay leaves. Parameter shapes are constants
    (``param_shapes_constant``), so ``if self.weight.dim() == 2`` traces."""

    def __init__(self, opaque: set[str] = frozenset()) -> None:
        super().__init__(param_shapes_constant=True)
        self.opaque = set(opaque)
        self.calls: list[str] = []  # module stack; left as is when a trace fails

    def call_module(self, m, forward, args, kwargs):
        self.calls.append(self.path_of_module(m))
        out = super().call_module(m, forward, args, kwargs)
        self.calls.pop()
        return out

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self.opaque:
            return True
        if not super().is_leaf_module(m, qualname):
            return False
        if isinstance(m, nn.MultiheadAttention):
            return True
        return all(name == "parametrizations" for name, _ in m.named_children())


def block_names(model: nn.Module) -> list[str]:
    """Qualified names of the blocks :func:`find_skips` checks (see the module docstring)."""
    names: list[str] = []

    def flatten(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            qual = f"{prefix}.{name}"
            if isinstance(child, (nn.Sequential, nn.ModuleList)):
                flatten(qual, child)
            else:
                names.append(qual)

    for name, child in model.named_children():
        if name == "blocks" and isinstance(child, (nn.Sequential, nn.ModuleList)):
            flatten(name, child)
        else:
            names.append(name)
    return names


def _has_tensor(value) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, (list, tuple)):
        return any(_has_tensor(v) for v in value)
    if isinstance(value, dict):
        return any(_has_tensor(v) for v in value.values())
    return False


def _carriers(node: fx.Node) -> list[fx.Node]:
    """Input nodes of ``node`` whose *values* flow into its output."""
    if node.op == "call_function" and node.target in _VALUELESS_FUNCTIONS:
        return []
    if node.op == "call_method":
        if node.target in _VALUELESS_METHODS:
            return []
        if node.target.endswith("_as") or node.target in ("to", "type"):
            first = node.args[0] if node.args else None
            return [first] if isinstance(first, fx.Node) else []
    return list(node.all_input_nodes)


def _op_label(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return f"{node.target} ({type(modules[node.target]).__name__})"
    if node.op == "call_method":
        return f".{node.target}()"
    if node.op == "output":
        return "output"
    return node.name


def _trace(model: nn.Module) -> tuple[fx.Graph, fx.GraphModule]:
    """Trace ``model``; a sub-module that cannot be traced (Python control flow on its input)
    becomes an opaque leaf — counted as a weight layer if it holds tensors — with a warning."""
    opaque: set[str] = set()
    while True:
        tracer = _Tracer(opaque)
        try:
            graph = tracer.trace(model)
            break
        except Exception as e:
            inner = tracer.calls[-1] if tracer.calls else ""
            if not inner or inner in opaque:
                raise TypeError(
                    f"cannot trace {type(model).__name__} with torch.fx: {e}"
                ) from e
            opaque.add(inner)
    if opaque:
        warnings.warn(
            "plainness: not traceable, checked as opaque layers: " + ", ".join(sorted(opaque)),
            stacklevel=3,
        )
    return graph, fx.GraphModule(tracer.root, graph)


def find_skips(model: nn.Module, example_input) -> list[Skip]:
    """Trace ``model`` with ``torch.fx`` and return every skip, one per (block, source tensor).

    ``example_input`` is a batch (a tensor, or a tuple of tensors for several inputs); the model
    is run once on it, in eval mode and without gradients (its mode is restored), to tell tensor
    values from shapes. An empty list means the model is plain.
    """
    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    graph, gm = _trace(model)
    modules = dict(gm.named_modules())

    # Run once to know which nodes hold tensors (shapes and ints do not carry data).
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
    tensor_nodes = {n for n, v in values.items() if _has_tensor(v)}

    nodes = list(graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    # Nodes that depend on the input; the others are constants (parameters and what is
    # computed from them only, e.g. a coder's [A; -A]).
    dependent: set[fx.Node] = set()
    for n in nodes:
        if n.op == "placeholder" or any(a in dependent for a in _carriers(n)):
            dependent.add(n)
    live = dependent & tensor_nodes
    live |= {n for n in nodes if n.op == "output"}
    users = {n: [u for u in n.users if u in live and n in _carriers(u)] for n in nodes}

    def is_weight_layer(n: fx.Node) -> bool:
        if n.op == "call_module":
            m = modules[n.target]
            has_state = any(True for _ in m.parameters()) or any(True for _ in m.buffers())
            return has_state and not isinstance(m, _NORMS)
        args = n.all_input_nodes
        has_const = any(a not in dependent for a in args)
        if n.op == "call_function" and n.target in _MIXING_FUNCTIONS:
            return has_const
        if n.op == "call_method" and n.target in _MIXING_METHODS:
            return has_const
        return False

    def calls_of(unit: str) -> list[set[fx.Node]]:
        """The block's nodes, one set per call (a module called twice is two blocks)."""
        calls: dict[str, set[fx.Node]] = {}
        for n in nodes:
            stack = n.meta.get("nn_module_stack") or {}
            # keys are "path" or "path@k" for the k-th call of a module; values (path, type)
            keys = [k for k, v in stack.items() if v[0] == unit]
            if not keys and n.op == "call_module" and (
                n.target == unit or n.target.startswith(unit + ".")
            ):
                keys = [unit]
            for k in keys[:1]:
                calls.setdefault(k, set()).add(n)
        return list(calls.values())

    skips: list[Skip] = []
    for unit, inside in ((u, c) for u in block_names(model) for c in calls_of(u)):
        if not inside & live:
            continue
        # ancestors (sources) and descendants (sinks) of the block, outside it
        ancestors: set[fx.Node] = set()
        work = deque(n for n in inside)
        while work:
            n = work.popleft()
            for a in _carriers(n):
                if a in live and a not in inside and a not in ancestors:
                    ancestors.add(a)
                    work.append(a)
        descendants: set[fx.Node] = set()
        work = deque(inside)
        while work:
            n = work.popleft()
            for u in users[n]:
                if u not in inside and u not in descendants:
                    descendants.add(u)
                    work.append(u)
        stops = {n for n in inside if is_weight_layer(n)}
        # nodes from which the block's weight layers are reached (the block's real inputs)
        feeds_layers: set[fx.Node] = set()
        work = deque(stops)
        while work:
            for a in _carriers(work.popleft()):
                if a in live and a not in feeds_layers:
                    feeds_layers.add(a)
                    work.append(a)
        for src in sorted(ancestors, key=order.__getitem__):
            # Breadth-first from src over non-source nodes, stopped by the block's weight layers.
            # Through the block's parameter-free ops only if src also feeds the block's layers:
            # a block without layers on src's way (a LayerNorm, an activation) just computes its
            # output. Around the block altogether is always a skip.
            closed = src not in feeds_layers
            parent: dict[fx.Node, fx.Node | None] = {src: None}
            work = deque([src])
            found = None
            while work and found is None:
                n = work.popleft()
                for u in users[n]:
                    if u in parent or u in ancestors or u in stops or (u in inside and closed):
                        continue
                    parent[u] = n
                    if u in descendants:
                        found = u
                        break
                    work.append(u)
            if found is None:
                continue
            path_nodes = []
            n = parent[found]
            while n is not None and n is not src:
                path_nodes.append(n)
                n = parent[n]
            path = [_op_label(n, modules) for n in path_nodes]
            v = values.get(src)
            shape = tuple(v.shape) if isinstance(v, torch.Tensor) else None
            skips.append(
                Skip(unit, src.name, _op_label(found, modules), tuple(reversed(path)), shape)
            )
    return skips


def assert_plain(model: nn.Module, example_input) -> None:
    """Raise :class:`NotPlainError` listing every skip if ``model`` is not plain."""
    skips = find_skips(model, example_input)
    if skips:
        name = getattr(model, "pnnh_name", type(model).__name__)
        lines = "\n  ".join(str(s) for s in skips)
        raise NotPlainError(f"{name} is not plain: {len(skips)} skip(s)\n  {lines}")
