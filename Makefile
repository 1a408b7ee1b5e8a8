# `make demo` and `make test` bootstrap the virtualenv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow test-all bench bench-quality clean

$(STAMP): setup.py constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch is pinned in the same pip command as the rest (constraints.txt): installed alone later,
	# diffusers would pull a multi-GB CUDA build of torch on a CPU machine.
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt torch -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m sgfast demo

test: $(STAMP)
	$(PY) -m pytest -q

# Slow and torch.compile tests, left out of `make test`.
test-slow: $(STAMP)
	$(PY) -m pytest -q -m "slow or compile"

test-all: $(STAMP)
	$(PY) -m pytest -q -m ""

bench: $(STAMP)
	$(PY) -m benchmarks

bench-quality: $(STAMP)
	$(PY) -m benchmarks.quality

clean:
	rm -rf $(VENV) build *.egg-info outputs
