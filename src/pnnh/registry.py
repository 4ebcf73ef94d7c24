"""The model registry, in the style of timm: ``@register_model`` on one function per public name.

This module is the pure registry — the name → :class:`ModelInfo` table, the decorator that fills
it and the validation of a model's options — and imports no model family. Building a model
(``create_model``, ``list_models``, ``model_info``) lives one step up, in :mod:`pnnh.models`,
whose ``__init__`` imports every family (as ``timm.models`` does).

Every factory accepts ``in_shape`` (input shape without the batch dimension, e.g. ``(1, 40)``
for MNIST-1D or ``(3, 32, 32)`` for CIFAR) and ``num_classes``, plus its own size arguments
(``depth``, ``width``, ...). A factory may group options in one frozen dataclass parameter
(``register_model(..., options=CoderOptions)`` with a parameter ``coder: CoderOptions =
CoderOptions()``): the dataclass's fields are then options of the model like the others
(``create_model("pnnh_mlp", coder_constraint="penalty")``), and the parameter's default holds
the family's defaults.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from pnnh.errors import ConfigError

#: Options ``create_model`` applies to any model whose factory does not take them itself:
#: norm preservation (:func:`pnnh.norm_preservation.make_norm_preserving`) and TAT
#: (:func:`pnnh.tat.apply_tat`).
WRAPPER_OPTIONS = ("procrustes", "zca", "tat", "tat_eta")


@dataclass(frozen=True)
class ModelInfo:
    name: str
    family: str  # e.g. "mlp", "cnn1d", "cifar", "vit", "shortcut"
    kind: str  # "plain", "resnet", "pnnh" or "other"
    description: str
    factory: Callable[..., nn.Module]
    defaults: dict = field(default_factory=dict)
    options_param: str | None = None  # the factory parameter holding an options dataclass
    options_omit: tuple[str, ...] = ()  # fields of that dataclass this model does not take

    def parameters(self) -> list[str]:
        """Option names, in signature order; an options dataclass contributes its fields."""
        out: list[str] = []
        for p in inspect.signature(self.factory).parameters:
            if p == self.options_param:
                out.extend(f.name for f in dataclasses.fields(self._options_default())
                           if f.name not in self.options_omit)
            elif p != "kwargs":
                out.append(p)
        return out

    def accepts_any(self) -> bool:
        sig = inspect.signature(self.factory)
        return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())

    def _options_default(self):
        return inspect.signature(self.factory).parameters[self.options_param].default


_REGISTRY: dict[str, ModelInfo] = {}


def register_model(name: str | None = None, *, family: str, kind: str, description: str = "",
                   options: type | None = None, omit: tuple[str, ...] = (), **defaults):
    """Decorator registering ``factory`` under ``name`` (default: the function's own name).

    ``options`` names a frozen dataclass type: the factory's parameter whose default is an
    instance of it carries those options (see the module docstring); ``omit`` names fields this
    model does not take (``coder_kernel`` on a model without convolutions). ``defaults`` are extra
    keyword arguments passed on to the factory when the caller does not give them.
    """
    if kind not in {"plain", "resnet", "pnnh", "other"}:
        raise ValueError(f"kind must be plain/resnet/pnnh/other, got {kind!r}")

    def deco(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = name or factory.__name__
        if key in _REGISTRY:
            raise ValueError(f"model {key!r} registered twice")
        param = None
        if options is not None:
            params = inspect.signature(factory).parameters.values()
            param = next((p.name for p in params if isinstance(p.default, options)), None)
            if param is None:
                raise ValueError(f"{factory.__name__} has no parameter defaulting to a "
                                 f"{options.__name__}")
        doc = description or (inspect.getdoc(factory) or "").split("\n")[0]
        _REGISTRY[key] = ModelInfo(key, family, kind, doc, factory, dict(defaults), param,
                                   tuple(omit))
        return factory

    return deco


def registered(name: str) -> ModelInfo:
    """The :class:`ModelInfo` of ``name``, or a one-line ConfigError listing the known names.

    Only the families imported so far are known: use :func:`pnnh.models.model_info`.
    """
    if name not in _REGISTRY:
        raise ConfigError(
            f"unknown model {name!r} (field 'model'); known models: {', '.join(sorted(_REGISTRY))}",
            field="model",
        )
    return _REGISTRY[name]


def registered_names() -> list[str]:
    return sorted(_REGISTRY)


#: Optional sizes the command line and the probes hand to every factory, ``None`` when unset.
PASSED_THROUGH = ("depth", "width")


def resolve_options(info: ModelInfo, kwargs: dict) -> tuple[dict, dict]:
    """Split ``kwargs`` into the factory's keyword arguments and the wrapper options.

    ``None`` values of the names the factory takes, and of the optional sizes callers pass
    straight through (:data:`PASSED_THROUGH`), are dropped; a ``None`` under any other name
    is an unknown option like any other (``--model-arg a=NULL``). The registration's
    defaults fill in what is missing; fields of the options dataclass are
    gathered into it. Returns ``(factory_kwargs, wrappers)`` where ``wrappers`` holds the
    :data:`WRAPPER_OPTIONS` the factory does not take. An unknown name is a one-line
    ConfigError naming the valid ones.
    """
    accepted = info.parameters()
    open_ended = info.accepts_any()
    stray = {k for k, v in kwargs.items()  # a null under a name nobody takes
             if v is None and k not in (*accepted, *PASSED_THROUGH, *WRAPPER_OPTIONS)}
    merged = {**info.defaults, **{k: v for k, v in kwargs.items() if v is not None}}
    wrappers = {k: merged.pop(k) for k in WRAPPER_OPTIONS
                if k in merged and k not in accepted and not open_ended}
    if "tat_eta" in wrappers and not wrappers.get("tat"):
        raise ConfigError("tat_eta: only applies with tat=True (--tat); without it the model "
                          "keeps its ReLUs and tat_eta would be ignored", field="tat_eta")
    if not open_ended:
        unknown = sorted((set(merged) - set(accepted)) | stray)
        if unknown:
            raise ConfigError(f"model {info.name!r} does not take option(s) "
                              f"{', '.join(unknown)}; it takes: {', '.join(accepted)}",
                              field=unknown[0])
    if info.options_param is not None:
        default = info._options_default()
        names = {f.name for f in dataclasses.fields(default)}
        given = {k: merged.pop(k) for k in list(merged) if k in names}
        merged[info.options_param] = dataclasses.replace(default, **given)
    return merged, wrappers
