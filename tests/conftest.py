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

# Property tests (hypothesis) draw the same examples on every run, so a suite that passed
# passes again from a fresh clone (a random draw once found a bug in CI's run and not in the
# run before it). PNNH_FUZZ=explore draws new examples each run, to look for more.
try:
    from hypothesis import settings as _hypothesis_settings
except ImportError:  # the dev extra is not installed: the property tests will say so
    pass
else:
    _hypothesis_settings.register_profile("pnnh-repeatable", derandomize=True)
    _hypothesis_settings.register_profile("pnnh-explore", derandomize=False)
    _hypothesis_settings.load_profile(
        "pnnh-explore" if os.environ.get("PNNH_FUZZ") == "explore" else "pnnh-repeatable")


#: the user's pnnh cache, where the set-up (`make data`: `pnnh data fetch`) put the real data
#: sets, before :func:`_isolated_cache` points PNNH_CACHE_DIR at a per-session one
USER_CACHE_DIR = os.environ.get("PNNH_CACHE_DIR")


@pytest.fixture
def user_cache(monkeypatch):
    """For one test, the user's own pnnh cache again (the real data the set-up fetched)."""
    if USER_CACHE_DIR is None:
        monkeypatch.delenv("PNNH_CACHE_DIR", raising=False)
    else:
        monkeypatch.setenv("PNNH_CACHE_DIR", USER_CACHE_DIR)


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


def pytest_collection_modifyitems(config, items):
    """Tests marked ``ecosystem`` build real torchvision/timm/transformers models: they run in
    ``make test-ecosystem`` (``pytest -m ecosystem`` in .venv-ecosystem) and skip, saying so,
    in every other run."""
    if "ecosystem" in (config.getoption("markexpr", "") or "").replace("not ecosystem", ""):
        return
    skip = pytest.mark.skip(reason="real torchvision/timm/transformers models: "
                                   "`make test-ecosystem` runs them")
    for item in items:
        if "ecosystem" in item.keywords:
            item.add_marker(skip)
