# Two entry points (README): `make demo` and `make test`. Both install what they need.
PYTHON ?= python
PIP ?= $(PYTHON) -m pip
# nvcc lives here on the build machines; torch would guess /usr/local.
export CUDA_HOME ?= $(firstword $(wildcard /usr/local/cuda))

.PHONY: install install-test demo lint test bench study gpu

# torch: keep the one the machine has (the GPU machine has its own, with no registry access);
# otherwise take 2.14.1 (on this project's machines it installs from local disk).
install:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "torch==2.14.1"
	$(PIP) install -q "setuptools>=64" wheel ninja pybind11 numpy safetensors
	$(PIP) install -q --no-build-isolation -e .

install-test: install
	$(PIP) install -q pytest hypothesis pytest-benchmark "ruff>=0.17,<0.18"
	# The optional logging sinks, for their tests (tests/test_sinks.py).
	$(PIP) install -q tensorboard
	# Peers for the parity tests (tests/test_peers.py); dictionary-learning without its deps.
	$(PIP) install -q -r requirements-peers.txt
	$(PIP) install -q --no-deps -r requirements-peers-nodeps.txt
	# A headless browser for the dashboard's page test (tests/test_dashboard.py skips it without one).
	command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; } || echo "chromium not installed: the dashboard's page test will be skipped"

# The embedded default: synthetic features with a known ground truth, no download (~1 min on
# 2 CPU cores): trains a Gated SAE, prints the feature recovery, metrics and step times.
demo: install
	$(PIP) install -q matplotlib
	$(PYTHON) -m gsae_fast.cli demo

# The measured studies (bench/results/study_*): the aux term (~1.5 min) and the feature-effect
# estimators on a random-weight transformers model (~1 min), 2 CPU cores.
study: install
	$(PIP) install -q matplotlib transformers
	$(PYTHON) -m gsae_fast.cli study

# Lint and import order (pyproject.toml [tool.ruff]), before the tests.
lint:
	$(PYTHON) -m ruff check .

test: install-test lint
	$(PYTHON) -m pytest -q tests
	# The CUDA kernels again on the CPU emulator, under a second schedule (blocks and threads
	# shuffled: a missing barrier shows as a failure in one of the two runs) and with buffers
	# against the guard page before them (underruns fault; 64-byte aligned).
	GSAE_FAST_EMU_SCHEDULE=shuffle:1 GSAE_FAST_EMU_MEMORY=start $(PYTHON) -m pytest -q \
		-k cuda_emulated tests/test_ops.py \
		tests/saes tests/test_cuda_emulated.py

bench: install
	$(PYTHON) bench/bench_step.py

# On a machine with a GPU (no registry needed): builds the CUDA kernels, runs the GPU tests, the
# sanitizers, a one-GPU torchrun run and the bf16 benchmark in at most ~9 minutes; logs and
# summary.md in OUT (bench/gpu_check.py; --dry runs the same steps on CPU).
OUT ?= bench/results/gpu_check_$(shell date +%Y-%m-%d_%H%M)
gpu:
	python3 bench/gpu_check.py $(OUT)
