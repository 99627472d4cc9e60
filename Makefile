# Two commands on a fresh machine with Python 3.11: `make demo` and `make test`.
# Each creates or updates the virtual environment in .venv first.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check --no-compile
# Tests run on the CPU build of PyTorch; GPU users install the torch they need first
# (an installed torch that satisfies the package's range is kept).
TORCH_SPEC ?= torch==2.13.0
RUNTIME := $(VENV)/.mmsafe-runtime
DEV := $(VENV)/.mmsafe-dev

.PHONY: demo test install lint browser clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(RUNTIME): pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(PIP) "$(TORCH_SPEC)"
	$(PIP) -e .
	touch $(RUNTIME)

$(DEV): pyproject.toml $(RUNTIME)
	$(PIP) -e ".[dev]"
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
	$(BIN)/python -m pytest -q

lint: $(DEV)
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) mmsafe-demo .pytest_cache
