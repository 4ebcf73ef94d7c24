"""Model families, and building them by name.

Importing this package imports every family file, which registers its models with
:mod:`pnnh.registry` (one ``@register_model`` function per public name); then
:func:`create_model`, :func:`list_models` and :func:`model_info` see them all. A new family
is one file here and one line below (docs/ARCHITECTURE.md, "Extending pnnh").
"""

from pnnh.models import mlp  # noqa: F401
from pnnh.models import cifar, cnn1d, imagenet  # noqa: F401
from pnnh.models import procrustes  # noqa: F401
from pnnh.models import shortcut  # noqa: F401
from pnnh.models import vit  # noqa: F401
from pnnh.models.factory import count_parameters, create_model, list_models, model_info

__all__ = ["create_model", "list_models", "model_info", "count_parameters"]
