# Two commands do all the set-up on a fresh machine (Python >= 3.10 with venv):
#   make demo   - create .venv, install dcdit (CPU torch 2.13.0), sample MNIST digits with the shipped DC-DiT
#   make test   - create .venv, install dcdit with its test extras, run the default test suite
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/dcdit demo --out demo_output

test: $(VENV)/.installed
	$(PY) -m pytest -q -n 2

test-slow: $(VENV)/.installed
	$(PY) -m pytest -q -n 2 -m slow

.PHONY: install demo test test-slow
