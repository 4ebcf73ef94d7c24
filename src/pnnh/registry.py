"""The model registry, in the style of timm: ``create_model(name, **kwargs)``, ``list_models()``.

A model family registers a factory with :func:`register_model`. Every factory accepts
``in_shape`` (input shape without the batch dimension, e.g. ``(1, 40)`` for MNIST-1D or
``(3, 32, 32)`` for CIFAR) and ``num_classes``, plus its own size arguments (``depth``,
``width``, ...). Models are plain ``nn.Module``s.
"""

from __future__ import annotations

import fnmatch
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from pnnh.errors import ConfigError


@dataclass(frozen=True)
class ModelInfo:
    name: str
    family: str  # e.g. "mlp", "cnn1d", "cifar", "vit", "shortcut"
    kind: str  # "plain", "resnet", "pnnh" or "other"
    description: str
    factory: Callable[..., nn.Module]
    defaults: dict = field(default_factory=dict)

    def parameters(self) -> list[str]:
        return [p for p in inspect.signature(self.factory).parameters if p != "kwargs"]


_REGISTRY: dict[str, ModelInfo] = {}


def register_model(name: str, *, family: str, kind: str, description: str = "", **defaults):
    """Decorator registering ``factory`` under ``name``.

    ``defaults`` are extra keyword arguments passed on to the factory when the caller
    does not give them (useful to register ``resnet56`` as ``cifar_resnet`` with depth 56).
    """
    if kind not in {"plain", "resnet", "pnnh", "other"}:
        raise ValueError(f"kind must be plain/resnet/pnnh/other, got {kind!r}")

    def deco(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        doc = description or (inspect.getdoc(factory) or "").split("\n")[0]
        _REGISTRY[name] = ModelInfo(name, family, kind, doc, factory, dict(defaults))
        return factory

    return deco


def _ensure_loaded() -> None:
    import pnnh.models  # noqa: F401  (registers every family)


def list_models(filter: str = "", kind: str | None = None) -> list[str]:
    """Registered model names, sorted; ``filter`` is a substring or a glob (``pnnh*``)."""
    _ensure_loaded()
    names = sorted(_REGISTRY)
    if filter:
        if any(c in filter for c in "*?["):
            names = [n for n in names if fnmatch.fnmatch(n, filter)]
        else:
            names = [n for n in names if filter in n]
    if kind is not None:
        names = [n for n in names if _REGISTRY[n].kind == kind]
    return names


def model_info(name: str) -> ModelInfo:
    _ensure_loaded()
    if name not in _REGISTRY:
        raise ConfigError(
            f"unknown model {name!r} (field 'model'); known models: {', '.join(sorted(_REGISTRY))}",
            field="model",
        )
    return _REGISTRY[name]


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a registered model. Unknown keyword arguments are a clear error.

    ``None`` values are dropped so that callers may pass optional CLI values straight through.
    ``procrustes=True`` / ``zca=True`` on a factory that does not take them wraps the model
    with :func:`pnnh.norm_preservation.make_norm_preserving` (transition blocks projected
    after each step; ZCA-whitened classifier input). ``tat=True`` (with ``tat_eta``, default
    0.9) rebuilds a plain ReLU model with leaky-ReLU TAT activations and SUO/Delta init
    (:func:`pnnh.tat.apply_tat`).
    """
    info = model_info(name)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    merged = {**info.defaults, **kwargs}
    sig = inspect.signature(info.factory)
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())
    # Norm-preservation options (paper 2) apply to any model whose factory does not take them.
    generic = {k: bool(merged.pop(k)) for k in ("procrustes", "zca")
               if k in merged and k not in sig.parameters and not accepts_any}
    # TAT (leaky-ReLU kernel shaping, pnnh.tat) likewise applies to any plain model.
    tat = {k: merged.pop(k) for k in ("tat", "tat_eta")
           if k in merged and k not in sig.parameters and not accepts_any}
    if "tat_eta" in tat and not tat.get("tat"):
        raise ConfigError("tat_eta: only applies with tat=True (--tat); without it the model "
                          "keeps its ReLUs and tat_eta would be ignored", field="tat_eta")
    if not accepts_any:
        unknown = sorted(set(merged) - set(sig.parameters))
        if unknown:
            valid = ", ".join(p for p in sig.parameters)
            raise ConfigError(
                f"model {name!r} does not take option(s) {', '.join(unknown)}; it takes: {valid}",
                field=unknown[0],
            )
    try:
        model = info.factory(**merged)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"cannot build model {name!r}: {e}", field="model") from e
    if any(generic.values()):
        from pnnh.norm_preservation import make_norm_preserving

        model = make_norm_preserving(model, procrustes=generic.get("procrustes", False),
                                     zca=generic.get("zca", False))
    if tat.get("tat"):
        from pnnh.tat import apply_tat

        model = apply_tat(model, eta=float(tat.get("tat_eta", 0.9)))
    model.pnnh_name = name  # type: ignore[attr-defined]
    return model


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
