# Goldilocks: `make test` is the one test command (CI runs it via .ci/run).
SHELL := /bin/bash
VENV := .venv

# bench/peer: VM counts and repetitions (make bench PEER_N="100 500" PEER_REPS=3)
PEER_N ?= 100 500 1000 2000
PEER_REPS ?= 9

.PHONY: setup test demo bench bench-peer

setup:
	bash scripts/setup.sh

test: setup
	$(VENV)/bin/pytest -q

# The live demo (docs/simulation.md); DEMO_STAY=1 keeps it up until Ctrl-C.
demo: setup
	$(VENV)/bin/goldilocks demo $(if $(DEMO_STAY),--stay)

# Root: bench.peer starts private OVS and OVN daemons in network namespaces.
bench: setup
	$(VENV)/bin/python -m bench.compile
	$(VENV)/bin/python -m bench.peer --n $(PEER_N) --reps $(PEER_REPS)

bench-peer: setup
	$(VENV)/bin/python -m bench.peer --n $(PEER_N) --reps $(PEER_REPS)
