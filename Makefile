# The two quick-start commands: `make run` and `make test`. Both build the environment when missing.
VENV ?= $(or $(MEDSAM3_VENV),$(HOME)/.cache/medsam3-monai/venv)
PY := "$(VENV)/bin/python"

.PHONY: env run test bench

env:
	@bash scripts/setup_env.sh "$(VENV)"

run: env
	"$(VENV)/bin/medsam3" demo

test: env
	$(PY) -m pytest -q tests

bench: env
	$(PY) scripts/bench_network.py

# `make monailabel`: the MONAI Label environment (monailabel 0.8.5 + this package), apart from VENV because
# monailabel's pins clash with ours; see apps/monailabel_medsam3/README.md.
MONAILABEL_VENV ?= $(or $(MEDSAM3_MONAILABEL_VENV),$(HOME)/.cache/medsam3-monai/monailabel-venv)

.PHONY: monailabel

monailabel:
	@bash scripts/setup_monailabel_env.sh "$(MONAILABEL_VENV)"

# `make official`: Meta's official SAM3 code (sam3 0.1.4), the reference of tests/test_official_*.py
# (detector, tracker, preprocessing, segment) and scripts/check_official.py, in an environment of its
# own (never a dependency of this package).
OFFICIAL_VENV ?= $(or $(MEDSAM3_OFFICIAL_VENV),$(HOME)/.cache/medsam3-monai/sam3-official-venv)

.PHONY: official

official:
	@bash scripts/setup_official_env.sh "$(OFFICIAL_VENV)"

# `make litellm`: LiteLLM's proxy (litellm[proxy] 1.108.7), the real OpenAI-compatible server of
# tests/test_agent_litellm.py, in an environment of its own (never a dependency of this package).
LITELLM_VENV ?= $(or $(MEDSAM3_LITELLM_VENV),$(HOME)/.cache/medsam3-monai/litellm-venv)

.PHONY: litellm

litellm:
	@bash scripts/setup_litellm_env.sh "$(LITELLM_VENV)"
