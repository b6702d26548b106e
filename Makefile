# `make demo` and `make test` each create .venv on first use. `make help` lists the targets.
.DEFAULT_GOAL := help
PYTHON ?= python3
# The CPU wheel, which this machine holds locally. GPU users: `make test TORCH=torch` takes
# PyPI's default Linux wheel, a CUDA build of several GB (see the README).
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell echo '$(TORCH)' | cksum | cut -d' ' -f1)
DEMO_T ?= 300

.PHONY: help demo test lint clean

help:  ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-6s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

demo: $(STAMP)  ## set up, then compare activations, inits and gated cells into reports/
	$(BIN)/gradscope run --cell rnn --activation tanh --init pytorch --task adding --seq-len $(DEMO_T) --out reports/rnn-tanh-pytorch
	$(BIN)/gradscope run --cell rnn --activation sigmoid --init pytorch --task adding --seq-len $(DEMO_T) --out reports/rnn-sigmoid-pytorch
	$(BIN)/gradscope run --cell rnn --activation relu --init identity --task adding --seq-len $(DEMO_T) --out reports/rnn-relu-identity
	$(BIN)/gradscope run --cell rnn --activation tanh --init orthogonal --task adding --seq-len $(DEMO_T) --out reports/rnn-tanh-orthogonal
	$(BIN)/gradscope run --cell lstm --forget-bias 0 --task adding --seq-len $(DEMO_T) --out reports/lstm-fb0
	$(BIN)/gradscope run --cell lstm --forget-bias 3 --task adding --seq-len $(DEMO_T) --out reports/lstm-fb3
	$(BIN)/gradscope run --cell gru --task adding --seq-len $(DEMO_T) --out reports/gru
	$(BIN)/gradscope compare reports/rnn-sigmoid-pytorch reports/rnn-tanh-pytorch reports/rnn-tanh-orthogonal reports/rnn-relu-identity reports/lstm-fb0 reports/lstm-fb3 reports/gru --probe grad_h0 --out reports/comparison-grad_h0.png
	$(BIN)/gradscope compare reports/lstm-fb0 reports/lstm-fb3 --probe jacobian_c --out reports/comparison-lstm-cell-state.png

test: $(STAMP)  ## set up, then run the test suite
	$(BIN)/pytest -q

lint: $(STAMP)  ## ruff
	$(BIN)/ruff check gradscope tests

clean:  ## remove the virtual environment and outputs
	rm -rf $(VENV) reports runs
