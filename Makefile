# The two commands: `make serve` and `make test`. Both create .venv on first use.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | md5sum | cut -c1-12)
# Where `make serve` keeps its SQLite ledger (tiered.db): kept across restarts.
TIERED_STATE_DIR ?= $(CURDIR)/.state
export TIERED_STATE_DIR

.PHONY: serve usage test lint typecheck bench chaos install clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first and pinned: anything looser pulls a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0

$(STAMP): $(PY) pyproject.toml
	$(PIP) install -q -e '.[test]'
	rm -f $(VENV)/.installed-* && touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/tiered serve

usage: $(STAMP)  # the billing report of make serve's ledger; e.g. make usage ARGS="--format csv"
	$(VENV)/bin/tiered usage $(ARGS)

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy

bench: $(STAMP)
	$(PY) -m bench.engine_bench
	$(PY) -m bench.replica_bench
	$(PY) -m bench.admission_bench
	$(PY) -m bench.ledger_bench
	$(PY) -m bench.ledger_path_bench
	$(PY) -m bench.lora_bench
	$(PY) -m bench.finetune_bench
	$(PY) -m bench.finetune_serving_bench
	for s in throughput_sweep p3_overhead p4_isolation p5_fairness p6_prefix p7_autoscale; do \
		$(VENV)/bin/tiered bench run $$s --no-progress || exit 1; done
	$(VENV)/bin/tiered bench run p4_isolation --pinned --no-progress

chaos: $(STAMP)  # every fault in full, then the 10-minute soak; figures: RELIABILITY.md
	$(PY) -m cli.main chaos run all --out bench/results/chaos-all
	$(PY) -m cli.main chaos run soak --out bench/results/chaos-soak

clean:
	rm -rf $(VENV) .pytest_cache
