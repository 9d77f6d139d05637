# Two commands: `make demo` (the whole pipeline on the built-in synthetic dataset) and
# `make test`. Both create and fill .venv/ on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test profile clean-demo

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(PY) run.py profile --backbone resnet18 --size 320x640

profile: $(STAMP)
	$(PY) run.py profile --backbone resnet101 --size 320x640
