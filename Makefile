# `make demo`: a fresh machine to a verdict between two tiny configurations, three seeds each, on the CPU in minutes.
# `make test`: the whole test suite on the CPU (in random order with pytest-randomly, its seed printed
# at the end), then the numerics tests again on one thread (`make test-one-thread`).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is installed first, pinned to the CPU build that CI uses; on a GPU machine use e.g.
# `make demo TORCH=torch` (or install requirements.txt into your own environment).
TORCH ?= torch==2.13.0
DEMO := out/demo

.PHONY: test test-one-thread demo flags bench gpu-check clean

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

# The demo: three seeds each of the tiny baseline and the tiny model with rotary positions and Muon
# (the two switches interventions.md's tiny-scale table found better), 40 steps each to fit about
# 7 minutes on two cores (measured: BENCHMARKS.md), scored on the sample's test split and compared seed by
# seed: at 40 steps the pair measured 0.09 better, p 0.001 (interventions.md). Its runs live in
# out/demo/, replaced on every call.
DEMO_SEEDS := 42 43 44
DEMO_STEPS := --max_iters=40 --charts=False
DEMO_SWITCHES := --position=rope --optimizer=muon
DEMO_NOTE := "What a verdict here says: whether rotary positions with Muon change the test loss of this 2-layer, 64-wide model after 82k tokens by more than other seeds do. What it does not say: anything about the 163M model on 3.26B tokens, where an effect can shrink, vanish or reverse (this one was still behind at 30 steps: interventions.md); there, run the same comparison on GPUs (README.md)."

demo: $(VENV)/.installed
	$(BIN)/python prepare_data.py --dataset=sample
	rm -rf $(DEMO)
	for s in $(DEMO_SEEDS); do \
	  $(BIN)/python train.py config/tiny.toml $(DEMO_STEPS) --seed=$$s --run_name=tiny-s$$s --out_dir=$(DEMO)/tiny-s$$s && \
	  $(BIN)/python eval.py $(DEMO)/tiny-s$$s --ledger=$(DEMO)/results.jsonl && \
	  $(BIN)/python train.py config/tiny.toml $(DEMO_STEPS) $(DEMO_SWITCHES) --seed=$$s --run_name=rope-muon-s$$s \
	    --out_dir=$(DEMO)/rope-muon-s$$s && \
	  $(BIN)/python eval.py $(DEMO)/rope-muon-s$$s --ledger=$(DEMO)/results.jsonl || exit 1; \
	done
	$(BIN)/python sample.py $(DEMO)/rope-muon-s42 --num_samples=2 --max_new_tokens=30
	$(BIN)/python compare.py '$(DEMO)/tiny-s*' '$(DEMO)/rope-muon-s*' --charts=$(DEMO)/charts
	@echo $(DEMO_NOTE)

# docs/flags.md from the scripts' config dataclasses (tests/test_docs.py fails when it is stale).
flags: $(VENV)/.installed
	$(BIN)/python -m gpt_interventions.flagdoc

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
