import os

import pytest
import torch

os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Generated datasets (MNIST-1D) go to a per-session cache, not the user's."""
    old = os.environ.get("PNNH_CACHE_DIR")
    os.environ["PNNH_CACHE_DIR"] = str(tmp_path_factory.mktemp("pnnh-cache"))
    yield
    if old is None:
        os.environ.pop("PNNH_CACHE_DIR", None)
    else:
        os.environ["PNNH_CACHE_DIR"] = old


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
