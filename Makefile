# Goldilocks: `make test` is the one test command (CI runs it via .ci/run).
SHELL := /bin/bash
VENV := .venv

.PHONY: setup test demo bench

setup:
	bash scripts/setup.sh

test: setup
	$(VENV)/bin/pytest -q

demo: setup
	$(VENV)/bin/goldilocks demo

bench: setup
	$(VENV)/bin/python -m bench.compile
