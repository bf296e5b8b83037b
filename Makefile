# Two commands do everything on a fresh machine:  make demo   and   make test
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.raygpt-installed

.PHONY: setup demo train test test-fast lint format bench clean

# torch==2.13.0 goes in first and alone: the package's own `torch>=2.4` is then
# already satisfied, so pip never pulls the multi-GB CUDA wheels on a CPU box. The
# editable source gets its bytecode as pip writes it for installed packages: the first
# command after setup (two test workers at once) then compiles nothing.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/python -m compileall -q raygpt tests benchmarks
	touch $(STAMP)

setup: $(STAMP)

# The main job: an optimizer x learning-rate sweep on the embedded corpus.
demo: setup
	$(BIN)/python -m raygpt.sweep experiments/pydocs_char_sweep.toml --overwrite

# One training run on the embedded corpus.
train: setup
	$(BIN)/python -m raygpt.train experiments/pydocs_char_cpu.toml --overwrite

# tests/unit/ starts no Ray, so it runs on both cores at once (a file to a core, so a
# file's fixtures are built once); tests/cluster/ holds Ray clusters, one at a time.
test: test-fast
	$(BIN)/python -m pytest -q --durations=15 tests/cluster tests/gpu

# The tests that start no Ray (tests/unit/), for the edit-test loop.
test-fast: setup
	$(BIN)/python -m pytest -q -n 2 --dist loadfile tests/unit

lint: setup
	$(BIN)/ruff check raygpt tests benchmarks
	$(BIN)/ruff format --check raygpt tests benchmarks

format: setup
	$(BIN)/ruff format raygpt tests benchmarks
	$(BIN)/ruff check --fix raygpt tests benchmarks

bench: setup
	$(BIN)/python -m raygpt.bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
