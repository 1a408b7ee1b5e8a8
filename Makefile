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

bench: $(STAMP)
	$(PY) -m benchmarks

bench-quality: $(STAMP)
	$(PY) -m benchmarks.quality

clean:
	rm -rf $(VENV) build *.egg-info outputs

# Load test of `python -m sgfast serve` on loopback (tiny model, and the built-in one when installed):
# both schedulers on the same Poisson arrivals at several loads; latency percentiles, throughput within
# a p95 SLO, deadline misses; writes outputs/bench/serve_load.{json,png} and the "## Serving" section of
# benchmarks/RESULTS.md.
.PHONY: bench-serve test-serve-slow
bench-serve: $(STAMP)
	$(PY) benchmarks/serve_load.py

# The server's slow tests: the web page in headless Chromium, Ray Serve with two CPU replicas, SIGTERM
# to `python -m sgfast serve`, the request-schema fuzz with thousands of bodies.
test-serve-slow: $(STAMP)
	$(PY) -m pytest -q -m slow tests/test_serve_page.py tests/test_serve_ray.py tests/test_serve_faults.py tests/test_serve_input.py

# The attention-statistics kernels compiled offline for sm_80 / sm_90 (no GPU needed): registers,
# spills, shared memory, tensor-core instructions, programs against SMs; writes the "Kernels"
# section of benchmarks/RESULTS.md and outputs/bench/kernels.json.
.PHONY: bench-kernels
bench-kernels: $(STAMP)
	TRITON_INTERPRET=0 $(PY) -m benchmarks.kernels --json outputs/bench/kernels.json
