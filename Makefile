# Two commands on a fresh machine with Python 3.11: `make demo` and `make test`.
# Each creates or updates the virtual environment in .venv first.
# `make lint` checks the code with ruff (lint and format) and mypy (settings in pyproject.toml); `make format` formats it;
# `make check` is lint, then the tests (what CI runs).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check --no-compile
# torch is the one large download: shown with a progress bar, not --quiet.
PIP_VISIBLE := $(BIN)/python -m pip install --progress-bar on --disable-pip-version-check --no-compile
# Which torch: on a machine without nvidia-smi the CPU build (about 200 MB, from the
# configured package sources; tried first as TORCH_VERSION+cpu), else the plain spec,
# which on PyPI is the CUDA build (several GB with its NVIDIA packages).
# An installed torch that satisfies the package's range is kept.
#   TORCH_SPEC=torch==2.13.0+cu128   choose the build yourself
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu   install it from that index
#                                    (none by default: only the configured sources are asked)
TORCH_VERSION ?= 2.13.0
HAS_NVIDIA_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo yes)
TORCH_SPEC ?= $(if $(HAS_NVIDIA_GPU),torch==$(TORCH_VERSION),torch==$(TORCH_VERSION)+cpu)
TORCH_FALLBACK_SPEC ?= torch==$(TORCH_VERSION)
TORCH_INDEX_URL ?=
TORCH_INDEX := $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
RUNTIME := $(VENV)/.mmsafe-runtime
DEV := $(VENV)/.mmsafe-dev

.PHONY: demo test install lint format check browser clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(RUNTIME): pyproject.toml | $(BIN)/python
	@$(BIN)/python -c "import torch" 2>/dev/null || { \
	  echo "installing $(TORCH_SPEC)$(if $(TORCH_INDEX_URL), from $(TORCH_INDEX_URL)) (set TORCH_SPEC / TORCH_INDEX_URL to choose another build)"; \
	  start=$$(date +%s); \
	  $(PIP_VISIBLE) $(TORCH_INDEX) "$(TORCH_SPEC)" || { \
	    [ "$(TORCH_SPEC)" != "$(TORCH_FALLBACK_SPEC)" ] && \
	    echo "$(TORCH_SPEC) is not in the configured package sources; installing $(TORCH_FALLBACK_SPEC) instead" && \
	    $(PIP_VISIBLE) $(TORCH_INDEX) "$(TORCH_FALLBACK_SPEC)"; } || exit 1; \
	  echo "torch installed in $$(( $$(date +%s) - start ))s"; }
	$(PIP) -e .
	touch $(RUNTIME)

# The tests also run the benchmarks' small cases, so they get the bench extra (TRL) too.
$(DEV): pyproject.toml $(RUNTIME)
	$(PIP) -e ".[dev,bench]"
	touch $(DEV)

install: $(DEV)

demo: $(RUNTIME)
	$(BIN)/mmsafe demo --out mmsafe-demo

# Headless Chromium for the report-page tests (Debian's package; needs root and apt-get).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium not found: browser tests will be skipped (install Debian's chromium to run them)"; fi; }

test: $(DEV) browser
	$(BIN)/python -m pytest -q -n 2  # two workers (pytest-xdist): the suite is mostly single-threaded

lint: $(DEV)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy

format: $(DEV)
	$(BIN)/ruff format src tests benchmarks
	$(BIN)/ruff check --fix src tests benchmarks

check: lint test

clean:
	rm -rf $(VENV) mmsafe-demo .pytest_cache
