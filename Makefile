# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Both create .venv and install fl-merge into it first (once; again when pyproject changes).
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
ARGS   ?=

.PHONY: install demo test test-deployment clean

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: 2.13.0 is the local CPU wheel here; a bare `torch` pulls CUDA builds.
	$(PY) -m pip install -q torch==2.13.0
	# constraints.txt: the exact versions the documented numbers were measured with.
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# The default offline demo: K=4 MNIST-family tasks, fine-tuned as 4 Flower clients, merged once.
# Options: make demo ARGS="--run-config 'method=fedavg num-clients=6'"
demo: $(STAMP)
	$(VENV)/bin/fl-merge-run $(ARGS)

# Everything but the real multi-process deployment tests (at most 12 min on 2 cores).
test: $(STAMP)
	$(PY) -m pytest -q -m "not deployment" --durations=25

# Real SuperLink/SuperNode processes (loopback, network namespaces, killed processes, cut links;
# the lost-node tests use a 10 s heartbeat, so each waits ~20 s): ~8-10 min on 2 cores (8 min 8 s on a fresh clone, 8 Dec). CI runs both.
test-deployment: $(STAMP)
	$(PY) -m pytest -q -m deployment

clean:
	rm -rf $(VENV) outputs .pytest_cache
