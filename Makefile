# genai-cluster: two commands on a fresh machine.
#   make demo   set up, then train a small GPT on Shakespeare on an embedded local Ray (CPU) and sample from it
#   make test   set up, then run the whole test suite (unit + multi-worker integration)

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
RUNS   ?= $(HOME)/genai-runs
DEMO   ?= shakespeare-demo
PYTEST_ARGS ?=

export RAY_USAGE_STATS_ENABLED := 0
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test test-unit bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 10), "Python 3.10+ is required"'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# constraints.txt pins the exact tested set; torch==2.13.0 takes the CPU build on CPU-only machines.
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	$(PY) -m cluster.deepspeed_ops
	touch $(STAMP)

demo: setup
	$(PY) jobs/train_nlg.py --recipe shakespeare-char --storage $(RUNS) --name $(DEMO)
	$(PY) jobs/generate.py --checkpoint $(RUNS)/$(DEMO) --prompt "ROMEO:" --max-new-tokens 300

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

test-unit: setup
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# The whole benchmark suite on this machine (~100 min on 2 CPU cores, run it idle; medians of 3), then benchmarks/RESULTS.md.
# On a GPU machine run benchmarks/gpu_check.py too (see benchmarks/README.md) before the report.
bench: setup
	$(PY) benchmarks/bench_nlg.py
	$(PY) benchmarks/bench_streaming.py
	$(PY) benchmarks/bench_prepare.py
	$(PY) benchmarks/bench_gan.py
	$(PY) benchmarks/bench_tune.py
	$(PY) benchmarks/bench_system.py
	$(PY) benchmarks/bench_generate.py
	$(PY) benchmarks/report.py

clean:
	rm -rf $(VENV) .pytest_cache
