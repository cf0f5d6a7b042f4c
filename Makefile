# `make demo` and `make test` set themselves up: the venv lives in .venv/ (git-ignored).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench clean-demo

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch/torchvision are pinned in pyproject.toml (2.14.1 / 0.29.1: the builds this machine has on disk)
	# the ray extra too: the tests of `extract --engine ray` start a local Ray instance (CI runs them)
	$(BIN)/pip install -q -e '.[dev,download,ray]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/ruff check visearch tests benchmarks
	$(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/ruff check visearch tests benchmarks

demo: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH bash benchmarks/demo.sh

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_foundation.py

clean-demo:
	rm -rf demo
