# Two commands: `make demo` (the whole pipeline on the built-in synthetic dataset) and
# `make test` (every test; `make test-fast`: the unit tier alone, no Ray). All create and
# fill .venv/ on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# pyproject.toml declares version ranges; constraints.txt holds the exact, tested versions installed here.
CONSTRAINTS := constraints.txt

.PHONY: demo test test-fast profile clean-demo

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c $(CONSTRAINTS) -e '.[test]'
	touch $(STAMP)

# Two pytest-xdist workers, each taking whole files (module fixtures such as a Ray cluster or an
# MLflow server start once), longest files first (tests/conftest.py LONGEST_FIRST): the slow
# tests wait on processes they start as much as they compute, so two at once overlap.
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

# The tests not marked slow (no Ray, no subprocess pipeline run, no GPU check): about a minute.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" -n 2 --dist loadfile --no-loadscope-reorder

# The whole mission on the built-in synthetic dataset, in ./demo: generate it (once), shard
# it, train with 2 Ray workers (MLflow run + checkpoints), evaluate, then a small Ray Tune
# search whose winner is registered as dfdam-synthetic@champion, evaluated as trained (one scale) and as
# the paper evaluates (section 4.4: seven scales and flips, spread over 2 Ray workers).
DEMO := demo
RUN_NAME := $(shell date +%Y%m%d-%H%M%S)
DEMO_PY := ../$(PY) ../run.py

demo: $(STAMP)
	mkdir -p $(DEMO)
	test -f $(DEMO)/raw/dfdam_synthetic.json || $(PY) run.py make-synthetic --layout cityscapes --out $(DEMO)/raw
	$(PY) run.py shard --dataset cityscapes --root $(DEMO)/raw --out $(DEMO)/shards --shard-size 8 --split train val
	cd $(DEMO) && $(DEMO_PY) train --preset synthetic --data shards --workers 2 --name train-$(RUN_NAME)
	cd $(DEMO) && $(DEMO_PY) evaluate --model runs/train-$(RUN_NAME) --data shards
	cd $(DEMO) && $(DEMO_PY) tune --preset synthetic --data shards --trials 4 --epochs 4 --max-concurrent 2 \
		--workers-per-trial 1 --name tune-$(RUN_NAME)
	cd $(DEMO) && $(DEMO_PY) evaluate --model models:/dfdam-synthetic@champion --data shards
	cd $(DEMO) && $(DEMO_PY) evaluate --model models:/dfdam-synthetic@champion --data shards --ms --flip --workers 2
	@echo
	@echo "Look at the runs:  cd $(DEMO) && ../$(PY) -m mlflow ui --host 127.0.0.1 --backend-store-uri sqlite:///$$(pwd)/$(DEMO)/mlflow.db"

profile: $(STAMP)
	$(PY) run.py profile --backbone resnet101 --size 320x640

clean-demo:
	rm -rf $(DEMO)
