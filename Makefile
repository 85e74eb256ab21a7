# Every target works from a fresh clone: each depends on `install`, which is quick when already done.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-server-dev

.PHONY: install test serve demo bench lint clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[server,dev]'
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest

serve: install
	$(BIN)/python -m sandbox_server

demo: install
	@echo "make demo needs the model server (issue: model_server), which is not built yet." >&2
	@echo "The sandbox server is ready: run 'make serve' and POST code to http://127.0.0.1:8081/execute." >&2
	@exit 1

bench: install
	$(BIN)/python -m benchmarks

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache .bench
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
