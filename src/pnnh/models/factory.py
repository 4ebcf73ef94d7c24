"""Building registered models: ``create_model``, ``list_models``, ``model_info``.

These need every family registered, so they live in the models layer (as timm's
``_factory.create_model`` does): importing this module imports :mod:`pnnh.models`, whose
``__init__`` imports each family file. The registry itself (:mod:`pnnh.registry`) imports none.
"""

from __future__ import annotations

import fnmatch

from torch import nn

from pnnh.errors import ConfigError
from pnnh.norm_preservation import make_norm_preserving
from pnnh.registry import ModelInfo, registered, registered_names, resolve_options
from pnnh.tat import apply_tat


def list_models(filter: str = "", kind: str | None = None) -> list[str]:
    """Registered model names, sorted; ``filter`` is a substring or a glob (``pnnh*``)."""
    names = registered_names()
    if filter:
        if any(c in filter for c in "*?["):
            names = [n for n in names if fnmatch.fnmatch(n, filter)]
        else:
            names = [n for n in names if filter in n]
    if kind is not None:
        names = [n for n in names if registered(n).kind == kind]
    return names


def model_info(name: str) -> ModelInfo:
    """The registration of ``name``; an unknown name is a ConfigError listing the known ones."""
    return registered(name)


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
    factory_kwargs, wrappers = resolve_options(info, kwargs)
    try:
        model = info.factory(**factory_kwargs)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"cannot build model {name!r}: {e}", field="model") from e
    procrustes, zca = bool(wrappers.get("procrustes")), bool(wrappers.get("zca"))
    if procrustes or zca:
        model = make_norm_preserving(model, procrustes=procrustes, zca=zca)
    if wrappers.get("tat"):
        model = apply_tat(model, eta=float(wrappers.get("tat_eta", 0.9)))
    model.pnnh_name = name  # type: ignore[attr-defined]
    return model


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
