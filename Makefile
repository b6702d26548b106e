# `make demo` and `make test` each create .venv on first use. `make help` lists the targets.
.DEFAULT_GOAL := help
PYTHON ?= python3
# The CPU wheel, which this machine holds locally. GPU users: `make test TORCH=torch` takes
# PyPI's default Linux wheel, a CUDA build of several GB (see the README).
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell echo '$(TORCH)' | cksum | cut -d' ' -f1)

.PHONY: help demo test lint clean

help:  ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-6s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

demo: $(STAMP)  ## set up, then sweep activations, inits and gated cells into reports/
	$(BIN)/gradscope sweep --preset standard --out reports

test: $(STAMP)  ## set up, then run the test suite
	$(BIN)/pytest -q

lint: $(STAMP)  ## ruff
	$(BIN)/ruff check gradscope tests benchmarks

clean:  ## remove the virtual environment and outputs
	rm -rf $(VENV) reports runs
