# Two commands on a fresh machine: `make demo` and `make test`. Each sets itself up.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU build of torch; any torch >= 2.1 works with pnnh (pyproject.toml).
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test test-dispatch test-ecosystem lint venv venv-ecosystem data clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[dev,bench]"
	touch $@

# The real libraries users bring (torchvision, timm, Hugging Face transformers) get their own
# environment: torchvision does not import beside the CPU torch 2.13.0 build, so this one takes
# torch 2.14.1 + torchvision 0.29.1 (a CUDA build, ~5.5 GB, a few minutes to install).
ECO_VENV       ?= .venv-ecosystem
ECO_PY         := $(ECO_VENV)/bin/python
ECO_TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

venv-ecosystem: $(ECO_VENV)/.installed

$(ECO_VENV)/.installed: pyproject.toml Makefile
	test -x $(ECO_PY) || $(PYTHON) -m venv $(ECO_VENV)
	$(ECO_PY) -m pip install --quiet --disable-pip-version-check $(ECO_TORCH_SPEC)
	$(ECO_PY) -m pip install --quiet --disable-pip-version-check -e ".[dev,bench,ecosystem]"
	touch $@

# Fashion-MNIST from Debian's package (apt-get download + dpkg-deb -x, no root) into the pnnh
# cache (~/.cache/pnnh/fashion-mnist, or $$PNNH_CACHE_DIR). One line: fetched, already there
# (then it does nothing), or why it could not (no apt, no network), which never fails the
# set-up; in CI the test of the real files then fails instead, saying so.
data: venv
	@$(VENV)/bin/pnnh data fetch fashion_mnist

demo: venv data
	$(VENV)/bin/pnnh demo --out runs/demo

test: venv data
	$(PY) -m pytest

# The curvature and conversion tests again as another CPU would run them: MKL's dispatch fixed
# to its compatible (SSE) code path and one thread, so a result that leans on this machine's
# float32 sums (AVX2/AVX-512 kernels, the thread count) fails here, not on a user's machine.
DISPATCH_TESTS := tests/test_hessian.py tests/test_hessian_memory.py tests/test_bnfold.py \
	tests/test_convert.py tests/test_convert_layouts.py tests/test_equivalence.py \
	tests/test_export.py tests/test_lean_export.py

test-dispatch: venv
	MKL_CBWR=COMPATIBLE OMP_NUM_THREADS=1 $(PY) -m pytest $(DISPATCH_TESTS)

# The tests marked `ecosystem`: real torchvision, timm and transformers models at random init.
test-ecosystem: venv-ecosystem
	$(ECO_PY) -m pytest -m ecosystem

lint: venv
	$(VENV)/bin/ruff check .

clean:
	rm -rf runs build dist *.egg-info src/*.egg-info .pytest_cache
