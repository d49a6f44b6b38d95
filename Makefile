# Two commands a fresh clone needs: `make demo` (the whole story on synthetic data) and `make test`.
# Both create/reuse .venv/ and install what is missing, so each works as the very first command.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.mmcat-installed
DEMO   ?= demo
DEMO_PRODUCTS ?= 900
PYTEST_ARGS ?=
TEST_WORKERS ?= 2

.PHONY: demo test venv bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,serve]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/mmcat synth --out $(DEMO)/raw --num-products $(DEMO_PRODUCTS)
	$(VENV)/bin/mmcat pack $(DEMO)/raw/products.csv --out $(DEMO)/packed --workers 2 --image-size 128 \
		--max-samples-per-shard 100
	$(VENV)/bin/mmcat inspect $(DEMO)/packed
	rm -rf $(DEMO)/run
	$(VENV)/bin/mmcat train --config configs/tiny_cpu.yaml data.root=$(DEMO)/packed output_dir=$(DEMO)/run
	$(VENV)/bin/mmcat eval --model $(DEMO)/run/best --data $(DEMO)/packed --split test \
		--out $(DEMO)/run/test_metrics.json

# The SLURM tests' session fixture installs (apt-get, root) and starts the local cluster only when they run:
# a selection such as PYTEST_ARGS='-m "not slurm"' installs nothing.
# Two pytest workers (pytest-xdist): most tests wait on subprocesses, servers and daemons as much as they compute.
# One torch thread per worker, so two workers share the cores instead of oversubscribing them; --dist loadgroup
# keeps each xdist_group (the one local SLURM cluster) on one worker. TEST_WORKERS=0 runs in this process.
test: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest -n $(TEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(DEMO) .pytest_cache
