# Two commands on a fresh machine: `make demo` (the whole DAG on the embedded default) and
# `make test`. Both are idempotent and set up .venv themselves (torch first: the CPU build).
SHELL := /bin/bash
VENV := .venv
TORCH := torch==2.13.0
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export DVC_NO_ANALYTICS := 1
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export GX_ANALYTICS_ENABLED := false

.PHONY: demo test setup clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(VENV)/bin/python || python3 -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q $(TORCH)
	$(VENV)/bin/python -m pip install -q -c constraints.txt -e ".[test]"
	touch $@

demo: setup
	sft demo --out data
	dvc commit --force --quiet data.dvc
	dvc repro
	@echo; cat gate/gate.md

test: setup
	python -m pytest -q

clean:
	rm -rf base validate prepare train evaluate gate card data
