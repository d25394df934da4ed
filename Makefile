# Two entry points on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
CONSTRAINTS := constraints.txt

.PHONY: demo test bench clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(VENV)/bin/python pyproject.toml $(CONSTRAINTS)
	$(PIP) install -c $(CONSTRAINTS) -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install -c $(CONSTRAINTS) -e '.[test,bench]'
	touch $@

demo: $(VENV)/.installed
	$(PY) examples/quickstart.py

test: $(VENV)/.installed-test
	$(PY) -m pytest -q

bench: $(VENV)/.installed-test
	$(PY) -m benchmarks.run ridge_hypergradient
	$(PY) -m benchmarks.run qp_layer
	$(PY) -m benchmarks.run conic_suites
	$(PY) -m benchmarks.run sinkhorn
	$(PY) -m benchmarks.run sparse_ot

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
