# Two commands a fresh clone needs: `make demo` (the whole story on synthetic data) and `make test`.
# Both create/reuse .venv/ and install what is missing, so each works as the very first command.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.mmcat-installed
DEMO   ?= demo
PYTEST_ARGS ?=

.PHONY: demo test venv bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,serve]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/mmcat synth --out $(DEMO)/raw
	$(VENV)/bin/mmcat pack $(DEMO)/raw/products.csv --out $(DEMO)/packed --workers 2 --image-size 160
	$(VENV)/bin/mmcat inspect $(DEMO)/packed

test: $(STAMP)
	bash tools/local_slurm.sh ensure-installed
	$(PY) -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/bench_pack.py

clean:
	rm -rf $(DEMO) .pytest_cache
