# condiff: `make demo` and `make test` bootstrap .venv on a fresh machine, then run.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: venv demo test lint test-slow bench wheel clean

venv: $(STAMP)

$(STAMP): requirements.txt requirements-peers.txt pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -r requirements-peers.txt  # k-diffusion's samplers, a benchmark peer
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/condiff demo

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/ruff format --check src tests benchmarks scripts
	$(BIN)/lint-imports --no-cache

test: lint
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2  # two workers at one thread each: the two cores

test-slow: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -m slow

bench: $(STAMP)
	$(BIN)/python benchmarks/sampling_speed.py

wheel: $(STAMP)  # dist/condiff-*.whl: the code, the bundled models and the recipes (scripts/check_wheel.py tries it)
	rm -rf build
	$(BIN)/python -m build --wheel --no-isolation --outdir dist

clean:
	rm -rf $(VENV) outputs build dist
