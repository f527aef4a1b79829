# The README's commands. Each bootstraps .venv by itself on a fresh machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.stamp-base
ENGINE_STAMP := $(VENV)/.stamp-engine

.PHONY: demo test test-fast lint wheel bench bench-quick system-deps sandbox-deps engine-deps vllm-deps agents-deps \
	clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[test]'
	@touch $@

# Debian packages the tests use (a real Prometheus server and promtool, bubblewrap).
system-deps:
	@bash scripts/install-system-deps.sh

# What a harness run needs (bubblewrap for Case's sandbox), for the demo.
sandbox-deps:
	@bash scripts/install-system-deps.sh sandbox

# llama.cpp (built from source by pip, cached afterwards) for the `engine` test tier.
$(ENGINE_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[test,engine]'
	@touch $@

engine-deps: $(ENGINE_STAMP)

# vLLM (CPU build) for the `vllm` test tier, in its own venv (.cache/vllm-venv) so its pins
# never decide the project's; idempotent, about 3 minutes and 2.5 GB the first time.
vllm-deps:
	@bash scripts/install-vllm.sh

# Unmodified third-party agent CLIs (mini-swe-agent, aider) for the `agents` test tier, each in its own
# venv (.cache/agents/<name>), and their run profiles rendered to .cache/agents/<name>.toml.
agents-deps: $(STAMP)
	@bash scripts/install-agents.sh

demo: $(STAMP) sandbox-deps
	$(PY) -m harness demo

# ruff (rules in pyproject.toml) and mypy on proxy/ and harness/: part of `make test`.
lint: $(STAMP)
	$(VENV)/bin/ruff check proxy harness bench tests
	$(VENV)/bin/mypy

test: $(STAMP) lint system-deps engine-deps vllm-deps agents-deps
	$(PY) -m pytest -q

# Everything but the engine tiers, Prometheus, the wheel install, systemd and the third-party
# agents, for a quick edit loop.
test-fast: $(STAMP) sandbox-deps
	$(PY) -m pytest -q -m "not engine and not vllm and not prometheus and not wheel and not systemd and not agents"

# The wheel operators install (docs/operations.md), into dist/. build/ and the egg-info go first:
# setuptools copies stale files from an earlier build into the wheel.
wheel: $(STAMP)
	rm -rf build *.egg-info
	$(PY) -m pip wheel -q --no-deps -w dist .

# The benchmark: installs wrk, nginx and LiteLLM (its own venv, .cache/litellm-venv)
# when missing, then writes bench/results/latest.{md,json}. bench-quick: a few minutes.
bench: $(STAMP)
	@bash scripts/install-bench-deps.sh
	$(PY) -m bench

bench-quick: $(STAMP)
	@bash scripts/install-bench-deps.sh
	$(PY) -m bench --quick

clean:
	rm -rf $(VENV) build dist *.egg-info
