# Two commands on a new machine: `make demo` and `make test`. Each sets up .venv first, idempotently:
# torch 2.13.0 (CPU, from this machine's disk) before the project, so pip never pulls a CUDA build.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test soak bench clean
setup: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --retries 0 --timeout 10 --index-url https://download.pytorch.org/whl/cpu torch==2.13.0  # the CPU build (a wheel on disk, find-links, first; an index that is out of reach is skipped at once)
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

demo: setup
	$(BIN)/flywheel

test: setup
	$(BIN)/python -m pytest

soak: setup
	$(BIN)/python -m pytest -m soak -s -n 0

bench: setup  # every benchmark, on past one that fails; the failures named at the end (and the exit status)
	@failed=""; for b in benchmarks/*.py; do echo "# $$b" >&2; $(BIN)/python $$b || failed="$$failed $$b"; done; \
	if [ -n "$$failed" ]; then echo "# failed:$$failed" >&2; exit 1; fi

clean:
	rm -rf $(VENV) runs outputs .pytest_cache
