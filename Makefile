# Circuit Workbench: `make demo` and `make test` do all set-up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
# CPU build by default; on a GPU machine: make demo TORCH_SPEC="torch==2.13.0 --index-url <your CUDA wheel index>"
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck pytest bench browser clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/workbench demo

lint: $(STAMP)
	$(BIN)/ruff check workbench pipelines app tests benchmarks
	$(BIN)/ruff format --check workbench pipelines app tests benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy

# Debian's Chromium and ChromeDriver for the end-to-end browser tests.
browser:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
	  if [ "$$(id -u)" = "0" ]; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
	      || echo "chromium could not be installed: browser tests will be skipped"; \
	  else echo "not root: install chromium and chromium-driver to run the browser tests"; fi; \
	fi

pytest: $(STAMP) browser
	HF_HUB_OFFLINE=1 WANDB_MODE=disabled $(BIN)/pytest -q

test: lint typecheck pytest

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_head_patching.py
	HF_HUB_OFFLINE=1 $(BIN)/python -m benchmarks.bench_edges
	HF_HUB_OFFLINE=1 $(BIN)/python -m benchmarks.bench_sae_features

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
