# Two entry points on a fresh machine: `make demo` and `make test`. Both create .venv
# and install polyft into it first (torch is pinned below 2.14 so pip takes the CPU wheel).
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.polyft-installed
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= offline
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev,launchers]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/polyft run +exp=demo

test: install
	$(PY) -m pytest -q -p no:cacheprovider

bench: install
	$(PY) scripts/bench_train.py

clean:
	rm -rf outputs multirun
