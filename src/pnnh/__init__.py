"""pnnh: deep plain neural networks (no residual connections) and depth diagnostics."""

from pnnh.registry import count_parameters, create_model, list_models, model_info

__version__ = "0.1.0"

__all__ = ["create_model", "list_models", "model_info", "count_parameters", "train", "get_dataset"]


def __getattr__(name):  # lazy: keep `import pnnh` light
    if name == "train":
        from pnnh.train import train

        return train
    if name == "get_dataset":
        from pnnh.data import get_dataset

        return get_dataset
    if name == "to_plain":
        from pnnh.export import to_plain

        return to_plain
    raise AttributeError(f"module 'pnnh' has no attribute {name!r}")
