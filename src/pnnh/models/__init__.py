"""Model families. Importing this package registers every model with :mod:`pnnh.registry`."""

from pnnh.models import mlp  # noqa: F401
