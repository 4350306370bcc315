# Two commands for a fresh clone (see README):  make serve   |   make test
# The venv gets torch==2.13.0 first: an unpinned torch would pull a multi-GB CUDA build.
# The ray extra is installed too: the tests of `serve --ray` run in the default suite.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

$(BIN)/chatglm-gateway: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[test,dev,ray]"
	touch $@

install: $(BIN)/chatglm-gateway

serve: install
	$(BIN)/chatglm-gateway serve $(ARGS)

test: install
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check gateway adapters tests bench
	$(BIN)/mypy gateway adapters

.PHONY: install serve test lint
