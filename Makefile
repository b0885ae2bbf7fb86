# `make demo`: a fresh machine to a trained, evaluated model on the CPU in a few minutes.
# `make test`: the whole test suite on the CPU.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is installed first, pinned to the CPU build that CI uses; on a GPU machine use e.g.
# `make demo TORCH=torch` (or install requirements.txt into your own environment).
TORCH ?= torch==2.13.0

.PHONY: test demo clean

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -r requirements.txt
	touch $@

$(VENV)/.dev: $(VENV)/.installed requirements-dev.txt
	$(BIN)/pip install -q -r requirements-dev.txt
	touch $@

test: $(VENV)/.dev
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) out
