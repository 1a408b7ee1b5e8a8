# `make demo` and `make test` bootstrap the virtualenv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow test-all bench bench-quality mutate clean

$(STAMP): setup.py constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch is pinned in the same pip command as the rest (constraints.txt): installed alone later,
	# diffusers would pull a multi-GB CUDA build of torch on a CPU machine.
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt torch -e '.[dev,serve]'
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

# Mutation testing of the core modules (setup.cfg's [mutmut] section) with mutmut, in mutants/.
# MUTANTS picks mutants by name ("sgfast.edits*"); empty: all of them. Hours on 2 CPU cores.
MUTANTS ?=
mutate: $(STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[mutate]'
	# Go on to the list of survivors whatever the run's exit status.
	-$(VENV)/bin/mutmut run $(MUTANTS)
	$(VENV)/bin/mutmut results

bench: $(STAMP)
	$(PY) -m benchmarks

bench-quality: $(STAMP)
	$(PY) -m benchmarks.quality

clean:
	rm -rf $(VENV) build *.egg-info outputs

# Load test of `python -m sgfast serve` on loopback (tiny model, and the built-in one when installed):
# latency percentiles, throughput, deadline misses; writes outputs/bench/serve_load.json and the
# "## Serving" section of benchmarks/RESULTS.md.
.PHONY: bench-serve test-serve-slow
bench-serve: $(STAMP)
	$(PY) benchmarks/serve_load.py

# The server's slow tests: the web page in headless Chromium, Ray Serve with two CPU replicas.
test-serve-slow: $(STAMP)
	$(PY) -m pytest -q -m slow tests/test_serve_page.py tests/test_serve_ray.py
