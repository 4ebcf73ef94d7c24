"""Model families. Importing this package registers every model with :mod:`pnnh.registry`."""

from pnnh.models import mlp  # noqa: F401
from pnnh.models import cifar, cnn1d, imagenet  # noqa: F401
from pnnh.models import procrustes  # noqa: F401
from pnnh.models import shortcut  # noqa: F401
from pnnh.models import vit  # noqa: F401
