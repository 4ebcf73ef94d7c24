"""Graph capture for the plainness checker: ``torch.fx`` first, ``torch.export`` where fx fails.

:func:`capture` returns the model's computation as one ``torch.fx`` graph the checker
(:mod:`pnnh.plainness`) reads, and says which capture produced it:

1. ``"fx"`` — symbolic tracing (``torch.fx``) with torch.nn composite modules traced through;
   a sub-module whose forward does not trace (Python control flow on a traced value) is kept
   as one opaque op. The graph speaks in modules and functions (``blocks.0.fc (Linear)``,
   ``torch.relu``), and the model is never run during the trace.
2. ``"export"`` — when fx fails at the root (``for i in range(x.shape[0])``, ``len(x)``,
   a Hugging Face model) or leaves an opaque sub-module, ``torch.export.export(model, args,
   strict=False)`` runs the forward on fake tensors of the example's shapes, so Python control
   flow on shapes is resolved and only control flow on *values* fails. The graph is ATen ops
   after functionalization (``run_decompositions({})``: in-place ops become their functional
   forms; ``linear``, ``convolution``, ``layer_norm`` stay whole), with parameters, buffers
   and lifted constants as ``get_attr`` nodes and the flattened user inputs as placeholders.
   Each node keeps ``meta["nn_module_stack"]``, rewritten here to the model's own module names
   (``blocks.0.fc``) whatever spelling the torch version used (``L__self___blocks_0_fc``,
   ``L['self'].blocks[0].fc``).

When neither capture works, :class:`CaptureError` carries both reasons. Both run the model in
eval mode (its mode is restored): dropout is off and BatchNorm uses its running statistics.
"""

from __future__ import annotations

import inspect
import re
import warnings
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

__all__ = ["Capture", "CaptureError", "capture", "aten_name", "METHODS"]


class CaptureError(RuntimeError):
    """No capture could see the model (the message names each capture's failure)."""


@dataclass(frozen=True)
class Capture:
    """A captured model: ``gm`` runs on ``args`` (the flattened example inputs); ``method`` is
    ``"fx"`` or ``"export"``; ``opaque`` the sub-modules fx kept as single ops (``"fx"`` only);
    ``note`` why an earlier capture was not used (empty when fx saw everything)."""

    gm: fx.GraphModule
    method: str
    args: tuple
    opaque: tuple[str, ...] = ()
    note: str = ""


# ----------------------------------------------------------------------------- torch.fx
def _encoder_layer_forward(m: nn.TransformerEncoderLayer, src, src_mask=None,
                           src_key_padding_mask=None, is_causal=False):
    """``nn.TransformerEncoderLayer``'s reference computation (its forward's slow path)."""
    x = src
    if m.norm_first:
        x = x + m._sa_block(m.norm1(x), src_mask, src_key_padding_mask, is_causal=is_causal)
        return x + m._ff_block(m.norm2(x))
    x = m.norm1(x + m._sa_block(x, src_mask, src_key_padding_mask, is_causal=is_causal))
    return m.norm2(x + m._ff_block(x))


def _encoder_forward(m: nn.TransformerEncoder, src, mask=None, src_key_padding_mask=None,
                     is_causal=None):
    """``nn.TransformerEncoder``'s reference computation: its layers in turn, then ``norm``."""
    out = src
    for layer in m.layers:
        out = layer(out, src_mask=mask, src_key_padding_mask=src_key_padding_mask)
    return m.norm(out) if m.norm is not None else out


_TRACE_FORWARDS = {nn.TransformerEncoderLayer: _encoder_layer_forward,
                   nn.TransformerEncoder: _encoder_forward}


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
        reference = _TRACE_FORWARDS.get(type(m))
        if reference is not None and self.calls[-1] not in self.opaque:
            def forward(*a, _m=m, _f=reference, **k):
                return _f(_m, *a, **k)
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


def _positional(model: nn.Module, inputs: tuple | dict) -> tuple:
    """``inputs`` as positional arguments of ``model.forward`` (a dict of keyword inputs is
    bound to the forward's signature, defaults filling the gaps); ``TypeError`` if it cannot."""
    if not isinstance(inputs, dict):
        return inputs
    sig = inspect.signature(model.forward)
    bound = sig.bind(**inputs)
    bound.apply_defaults()
    args = []
    for p in sig.parameters.values():
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            args.append(bound.arguments[p.name])
        elif bound.arguments.get(p.name):
            raise TypeError(f"keyword input {p.name!r} is not a positional parameter")
    return tuple(args)


def _fx_capture(model: nn.Module, inputs: tuple | dict) -> Capture:
    """Trace ``model`` with fx; a sub-module that does not trace becomes an opaque leaf. Raises
    ``TypeError`` when the root itself does not trace."""
    inputs = _positional(model, inputs)
    opaque: set[str] = set()
    while True:
        tracer = _Tracer(opaque)
        try:
            graph = tracer.trace(model)
            break
        except Exception as e:
            inner = tracer.calls[-1] if tracer.calls else ""
            if not inner or inner in opaque:
                raise TypeError(f"{type(e).__name__}: {_first_line(e)}") from e
            opaque.add(inner)
    return Capture(fx.GraphModule(tracer.root, graph), "fx", inputs, tuple(sorted(opaque)))


# ----------------------------------------------------------------------------- torch.export
def aten_name(node: fx.Node) -> str | None:
    """The ATen op a ``call_function`` node calls, without overload and in-place suffix
    (``aten.relu_.default`` -> ``"relu"``); None for anything else."""
    target = node.target
    if node.op != "call_function" or not isinstance(target, (torch._ops.OpOverload,
                                                             torch._ops.OpOverloadPacket)):
        return None
    packet = getattr(target, "overloadpacket", target)
    return packet.__name__.rstrip("_") or packet.__name__


def _path_normaliser(model: nn.Module):
    """A function mapping any spelling of a module path in ``nn_module_stack`` to the model's
    own qualified name (``""`` for the root; unknown spellings are returned as they are)."""
    names = [n for n, _ in model.named_modules()]
    mangled = {re.sub(r"\W", "_", n): n for n in names}

    def normalise(path: str) -> str:
        p = re.sub(r"@\d+$", "", path)  # a module's second call: "blocks.1@1"
        for prefix in ("L['self'].", "L__self__.", "self."):
            if p.startswith(prefix):
                p = p[len(prefix):]
        p = re.sub(r"\[['\"]?([^\]'\"]+)['\"]?\]", r".\1", p).lstrip(".")
        if p in ("L['self']", "L__self__", "self"):
            return ""
        if p in names:
            return p
        key = re.sub(r"^L__self___?", "", p)
        return mangled.get(re.sub(r"\W", "_", key), p)

    return normalise


def _tensors_of(value) -> tuple:
    """The tensors in a forward's output, in order: a tensor, or those inside tuples, lists
    and dicts (a Hugging Face ``ModelOutput`` is a dict); other objects (a KV cache) are
    dropped, so that torch.export, which only returns pytrees of tensors, can take it."""
    if isinstance(value, torch.Tensor):
        return (value,)
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return tuple(t for v in value for t in _tensors_of(v))
    return ()


class _TensorOutputs(nn.Module):
    """``model`` with its output reduced to a tuple of tensors (:func:`_tensors_of`); the
    model is the child ``m``, so module paths read ``m.<path>`` (stripped again after export)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.m = model

    def forward(self, *args, **kwargs):
        return _tensors_of(self.m(*args, **kwargs))


def _export_capture(model: nn.Module, inputs: tuple | dict) -> Capture:
    """``torch.export`` (non-strict) of ``model`` on ``inputs`` (positional, or keyword when a
    dict), functionalized, unlifted."""
    args, kwargs = ((), inputs) if isinstance(inputs, dict) else (inputs, {})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch-internal deprecation notes during export
        ep = torch.export.export(_TensorOutputs(model).eval(), args, kwargs, strict=False)
        ep = ep.run_decompositions({})
        gm = ep.module()
    if args:
        _name_inputs(gm, model, len(args))
    normalise = _path_normaliser(model)
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if stack:
            node.meta["nn_module_stack"] = {
                k: (normalise(_unwrapped(v[0])), v[1]) for k, v in stack.items()}
    flat = tuple(torch.utils._pytree.tree_leaves((args, kwargs)))
    return Capture(gm, "export", flat)


def _name_inputs(gm: fx.GraphModule, model: nn.Module, n: int) -> None:
    """Name the placeholders of one tensor input each after ``model.forward``'s parameters
    (``x``, ``input_ids``) instead of the wrapper's ``args_0``."""
    try:
        params = [p.name for p in inspect.signature(model.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)][:n]
    except (TypeError, ValueError):
        return
    holders = [node for node in gm.graph.nodes if node.op == "placeholder"]
    if len(holders) == len(params) and hasattr(fx.Node, "_rename"):
        for node, name in zip(holders, params):
            node._rename(name)


def _unwrapped(path: str) -> str:
    """A module path inside :class:`_TensorOutputs` as the model's own (``m.blocks.0`` ->
    ``blocks.0``, ``L__self___m_blocks_0`` -> ``blocks_0``, ``m`` -> ``""``)."""
    for prefix in ("L['self'].m.", "L__self__.m.", "self.m.", "L__self___m_", "m."):
        if path.startswith(prefix):
            return path[len(prefix):]
    return "" if path in ("m", "L['self'].m", "L__self__.m", "L__self___m", "self.m") else path


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


METHODS = ("auto", "fx", "export")


def capture(model: nn.Module, inputs: tuple | dict, method: str = "auto") -> Capture:
    """The model's graph on ``inputs`` (a tuple of positional inputs, or a dict of keyword
    inputs such as ``{"input_ids": ids, "attention_mask": mask}``). ``method="auto"``: fx
    when it sees everything, else torch.export, else fx with opaque sub-modules; ``"fx"`` /
    ``"export"``: that capture only.
    :class:`CaptureError` when the capture(s) tried cannot see the model at all."""
    if method not in METHODS:
        raise ValueError(f"capture method must be one of {', '.join(METHODS)}, got {method!r}")
    was_training = model.training
    model.eval()
    try:
        return _capture(model, inputs, method)
    finally:
        model.train(was_training)


def _capture(model: nn.Module, inputs: tuple | dict, method: str) -> Capture:
    fx_cap, why_fx = None, ""
    if method != "export":
        try:
            fx_cap = _fx_capture(model, inputs)
        except TypeError as e:
            why_fx = str(e)
        if fx_cap is not None and (not fx_cap.opaque or method == "fx"):
            return fx_cap
        if method == "fx":
            raise CaptureError(f"torch.fx: {why_fx}")
        why_fx = why_fx or "cannot trace " + ", ".join(fx_cap.opaque)
    try:
        cap = _export_capture(model, inputs)
    except Exception as e:
        why_export = f"torch.export: {type(e).__name__}: {_first_line(e)}"
        if fx_cap is not None:
            return Capture(fx_cap.gm, "fx", fx_cap.args, fx_cap.opaque, why_export)
        raise CaptureError(f"torch.fx: {why_fx}; {why_export}" if why_fx else why_export) from e
    return Capture(cap.gm, cap.method, cap.args, (), f"torch.fx: {why_fx}" if why_fx else "")
