# Two commands on a fresh machine:
#   make run    set up, then chat with the default model (smollm2:135m)
#   make test   set up with the test dependencies, then run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
MODEL ?= smollm2:135m
PROMPT ?=

.PHONY: run test setup setup-dev bench clean

$(VENV)/.setup: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.setup-dev: $(VENV)/.setup
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.setup
setup-dev: $(VENV)/.setup-dev

run: setup
	$(VENV)/bin/herd run $(MODEL) $(if $(PROMPT),"$(PROMPT)")

test: setup-dev
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) .cache .pytest_cache
