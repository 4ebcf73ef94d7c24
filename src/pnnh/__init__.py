"""pnnh: deep plain neural networks (no residual connections) and depth diagnostics."""

from pnnh.data import get_dataset
from pnnh.models import count_parameters, create_model, list_models, model_info
from pnnh.train import TrainingInterrupted, train  # `train` shadows the submodule on purpose

__version__ = "0.1.0"

__all__ = [
    "create_model", "list_models", "model_info", "count_parameters", "train", "get_dataset", "to_plain",
    "TrainingInterrupted", "convert",
]


def __getattr__(name):  # lazy: keep `import pnnh` light
    if name == "to_plain":
        from pnnh.export import to_plain

        return to_plain
    if name == "convert":  # pnnh.convert.resnet_to_plain, without importing it up front
        import importlib

        return importlib.import_module("pnnh.convert")
    raise AttributeError(f"module 'pnnh' has no attribute {name!r}")
