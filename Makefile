# Two-command quick start: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install sysdeps demo test test-fast bench clean-venv

$(STAMP): setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# torch first, pinned to the local CPU wheel: never let a dependency pull a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,docker,notebooks]'
	@# SGLang's own JSON schema (sglang/api/v1/api_types.py, needs only msgspec) is the tests'
	@# contract for the SGLang client and `dagger-jax serve`; the server itself needs a GPU, so
	@# the wheel goes in without its dependencies.
	$(PY) -m pip install -q --no-deps 'sglang==0.5.23'
	@touch $@

install: $(STAMP)

# System packages the jobs need: bubblewrap (local sandbox), git (task repos), python3-pytest
# (the toy tasks' tests run with the system python inside the sandbox).
sysdeps:
	@bash .ci/sysdeps.sh bubblewrap git python3-pytest

demo: install sysdeps
	$(VENV)/bin/dagger-jax demo --config configs/demo.py

test: install sysdeps
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -m "not slow and not docker" $(PYTEST_ARGS)

bench: install
	@for b in benchmarks/*.py; do echo "== $$b"; $(PY) $$b --quick || exit 1; done

clean-venv:
	rm -rf $(VENV)
