# `make demo`: a fresh machine to two trained, evaluated, compared tiny models on the CPU in minutes.
# `make test`: the whole test suite on the CPU (in random order with pytest-randomly, its seed printed
# at the end), then the numerics tests again on one thread (`make test-one-thread`).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is installed first, pinned to the CPU build that CI uses; on a GPU machine use e.g.
# `make demo TORCH=torch` (or install requirements.txt into your own environment).
TORCH ?= torch==2.13.0
DEMO := out/demo

.PHONY: test test-one-thread demo bench gpu-check clean

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
	$(MAKE) test-one-thread

# A CPU's thread count changes the last bits of a result; the tests marked numerics (references
# computed in the same process, bitwise runs and resumes) must hold on one thread as on many.
test-one-thread: $(VENV)/.dev
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -m numerics tests

# The demo's runs live in out/demo/, which it replaces on every call; other runs are untouched.
demo: $(VENV)/.installed
	$(BIN)/python prepare_data.py --dataset=sample
	rm -rf $(DEMO)
	$(BIN)/python train.py config/tiny.toml --out_dir=$(DEMO)/tiny
	$(BIN)/python eval.py $(DEMO)/tiny --dataset=sample --split=test --ledger=$(DEMO)/results.jsonl
	$(BIN)/python train.py config/tiny.toml config/best.toml --run_name=tiny-best --out_dir=$(DEMO)/tiny-best
	$(BIN)/python eval.py $(DEMO)/tiny-best --dataset=sample --split=test --ledger=$(DEMO)/results.jsonl
	$(BIN)/python sample.py $(DEMO)/tiny-best --num_samples=3 --max_new_tokens=30
	$(BIN)/python compare.py $(DEMO)/tiny $(DEMO)/tiny-best --charts=$(DEMO)/charts

# The CPU figures of BENCHMARKS.md; `make bench NANOGPT=path/to/nanoGPT` adds the side-by-side.
bench: $(VENV)/.installed
	$(BIN)/python bench.py config/tiny.toml --steps=10 --warmup=3
	$(BIN)/python bench.py config/tiny.toml --steps=10 --warmup=3 --pad_vocab=True
	$(BIN)/python bench.py config/tiny.toml --steps=10 --warmup=3 --dtype=bfloat16
	$(BIN)/python bench.py config/tiny.toml --steps=10 --warmup=3 --dtype=bfloat16 --compile=True
	$(BIN)/python bench.py config/tiny.toml --steps=10 --warmup=3 --eval_batch_size=32
	$(BIN)/python benchmarks/bench_tokenizer.py
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/bench_moe.py --clock=cpu
	$(if $(NANOGPT),$(BIN)/python benchmarks/vs_nanogpt.py $(NANOGPT) --repeats=2 --stat=min)

# On a GPU machine: the check of BENCHMARKS.md's GPU figures, into $(OUT)/gpu-check.log.
gpu-check: $(VENV)/.installed
	PYTHON=$(BIN)/python bash benchmarks/gpu_check.sh

clean:
	rm -rf $(VENV) out
