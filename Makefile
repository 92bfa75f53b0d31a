# The two quick-start commands: `make run` and `make test`. Both build the environment when missing.
VENV ?= $(or $(MEDSAM3_VENV),$(HOME)/.cache/medsam3-monai/venv)
PY := $(VENV)/bin/python

.PHONY: env run test bench

env:
	@bash scripts/setup_env.sh $(VENV)

run: env
	$(VENV)/bin/medsam3 demo

test: env
	$(PY) -m pytest -q tests

bench: env
	$(PY) scripts/bench_network.py
