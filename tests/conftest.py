import os

# The suite asserts CPU behaviour (bit-identical resume, CPU tolerances), and the default
# device is "auto": on a machine with a GPU the trainings under test would move to CUDA. The
# GPU stays hidden from the tests and their subprocesses (CUDA initialises lazily, so this
# holds although torch is imported below) unless PNNH_TEST_CUDA=1; the GPU paths are checked
# by benchmarks/gpu_check.sh.
if os.environ.get("PNNH_TEST_CUDA") != "1":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

import pytest  # noqa: E402
import torch  # noqa: E402

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
