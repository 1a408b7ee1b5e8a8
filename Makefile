# `make demo` and `make test` bootstrap the virtualenv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow test-all bench bench-quality mutate clean docs docs-strict docs-sheet docs-charts

$(STAMP): setup.py constraints.txt requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# Exactly the versions the suite passed with (requirements.lock, every transitive package, hashes
	# checked, torch's CPU build among them), then sgfast itself without resolving anything again.
	# -qq: pip's own notices about this machine's package indexes are not ours to print.
	$(PY) -m pip install -qq --disable-pip-version-check --require-hashes -r requirements.lock
	$(PY) -m pip install -qq --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

# Refresh requirements.lock from setup.py's ranges (every extra CI installs, and docs), with hashes.
# pip-compile (pip-tools) rather than uv: it resolves with pip's own finder and configuration, so it
# locks the same torch file pip installs here (the CPU build), where uv would lock PyPI's CUDA build.
LOCK_ENV := build/lock-env
.PHONY: lock test-latest
lock:
	test -x $(LOCK_ENV)/bin/pip-compile || { $(PYTHON) -m venv $(LOCK_ENV) && $(LOCK_ENV)/bin/pip install -qq pip-tools==7.7.0; }
	CUSTOM_COMPILE_COMMAND='make lock' $(LOCK_ENV)/bin/pip-compile -q --generate-hashes --allow-unsafe --strip-extras --no-emit-index-url \
		--no-emit-find-links --extra dev --extra serve --extra ray --extra browser --extra mutate --extra docs \
		-c constraints.txt -o requirements.lock setup.py

# The newest releases setup.py allows, in a scratch environment, against the fast suite: the next
# breaking release of a dependency shows up here first, not in a newcomer's first command.
LATEST_ENV := build/latest-env
test-latest:
	rm -rf $(LATEST_ENV) && $(PYTHON) -m venv $(LATEST_ENV)
	$(LATEST_ENV)/bin/pip install -qq --disable-pip-version-check --upgrade -c constraints.txt torch -e '.[dev,serve]'
	$(LATEST_ENV)/bin/pip freeze --exclude-editable > $(LATEST_ENV)/versions.txt
	SGFAST_UNLOCKED=1 $(LATEST_ENV)/bin/python -m pytest -q

demo: $(STAMP)
	$(PY) -m sgfast demo

test: $(STAMP)
	$(PY) -m pytest -q

# Slow and torch.compile tests, left out of `make test`.
test-slow: $(STAMP)
	$(PY) -m pytest -q -m "slow or compile"

test-all: $(STAMP)
	$(PY) -m pytest -q -m ""

# What CI runs after `make test`: the slow and torch.compile tests with everything they need installed
# (Debian's chromium for the page; Playwright and Ray Serve come with the lock), and with
# SGFAST_NO_SKIP=1, so that a test that would skip for want of one of them fails instead.
.PHONY: test-ci-slow ci-deps
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
ci-deps: $(STAMP)
	command -v chromium >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium >/dev/null; }

test-ci-slow: ci-deps
	SGFAST_NO_SKIP=1 $(PY) -m pytest -q -m "slow or compile" --durations=10

# Mutation testing of the core modules (setup.cfg's [mutmut] section) with mutmut. mutmut mutates
# a copy of its source folder, and sgfast.kernels reaches the ops' sources in kernels/, outside
# sgfast/: so it runs in build/mutate/, a copy laid out as installed (kernels/*.py in sgfast/kernels/),
# and keeps its mutants and results in build/mutate/mutants/ (rerun: only changed functions).
# MUTANTS picks mutants by name ("sgfast.capture*"), and then reruns those even when they have a
# result; empty: all of them, skipping those with a result. Hours on 2 CPU cores.
# MUTATE_TESTS (test files) replaces setup.cfg's test selection for a narrower, faster run, e.g.
#   make mutate MUTATE_DIR=build/mutate-kernels MUTATE_TESTS=tests/test_attention_stats.py MUTANTS='"sgfast.kernels*"'
# (a run keeps its results per folder; a changed selection starts the folder's results over).
MUTANTS ?=
MUTATE_TESTS ?=
MUTATE_DIR ?= build/mutate
MUTATE_CHILDREN ?= 2
mutate: $(STAMP)
	rm -rf $(MUTATE_DIR)/sgfast $(MUTATE_DIR)/tests $(MUTATE_DIR)/benchmarks
	mkdir -p $(MUTATE_DIR)
	# cp -p keeps the times mutmut compares to know which files changed since its last run.
	cp -Rp sgfast tests benchmarks pytest.ini setup.cfg $(MUTATE_DIR)/
	cp -p kernels/*.py $(MUTATE_DIR)/sgfast/kernels/
	find $(MUTATE_DIR) -name __pycache__ -prune -exec rm -rf {} +
ifneq ($(strip $(MUTATE_TESTS)),)
	# The selection is the last setting of setup.cfg's [mutmut] section: replace it.
	$(PY) -c "import sys; p = sys.argv[1]; s = open(p).read(); key = 'pytest_add_cli_args_test_selection ='; \
	open(p, 'w').write(s[:s.index(key)] + key + '\n' + ''.join('    ' + t + '\n' for t in sys.argv[2:]))" \
	$(MUTATE_DIR)/setup.cfg $(MUTATE_TESTS)
endif
	# One torch thread per child: the children already use the cores.
	# Go on to the list of survivors whatever the run's exit status.
	-cd $(MUTATE_DIR) && OMP_NUM_THREADS=1 $(abspath $(VENV))/bin/mutmut run --max-children $(MUTATE_CHILDREN) $(MUTANTS)
	cd $(MUTATE_DIR) && $(abspath $(VENV))/bin/mutmut results

bench: $(STAMP)
	$(PY) -m benchmarks
	$(PY) -m benchmarks.charts

# Ops and host syncs per step (plain diffusers vs guided, both guided-step forms) for the SD1.5 and
# SDXL architectures, with the FLOP floor beside them: the "Ops per step" section of benchmarks/RESULTS.md.
.PHONY: bench-ops
bench-ops: $(STAMP)
	$(PY) -m benchmarks.ops --json outputs/bench/ops.json

bench-quality: $(STAMP)
	$(PY) -m benchmarks.quality
	$(PY) -m benchmarks.photo_edit --scenes 50 --results

clean:
	rm -rf $(VENV) build *.egg-info outputs site

# Load test of `python -m sgfast serve` on loopback (tiny model, and the built-in one when installed):
# both schedulers on the same Poisson arrivals at several loads; latency percentiles, throughput within
# a p95 SLO, deadline misses; writes outputs/bench/serve_load.{json,png} and the "## Serving" section of
# benchmarks/RESULTS.md.
.PHONY: bench-serve test-serve-slow
bench-serve: $(STAMP)
	$(PY) -m benchmarks.serve_load

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

# Every GPU measurement in one command (python -m benchmarks.gpu): kernels against float64, kernel time
# against the HBM floor, SD1.5/SDXL steps, 50-step images, energy; writes outputs/bench/gpu.json and the
# "## GPU" section of benchmarks/RESULTS.md. It runs on the machine's own python3, torch and triton (no
# virtualenv); benchmarks/bench_gpu.sh installs sgfast (and with WHEELS=dir the wheels `make wheelhouse`
# collected) into GPU_SITE with no network, and is the same command where make is missing.
# ARGS passes options through, e.g. ARGS=--quick, ARGS="--budget-s 300", ARGS=--dry-run.
.PHONY: bench-gpu wheelhouse
GPU_PYTHON ?= python3
GPU_SITE ?= outputs/gpu-site
WHEELS ?=
ARGS ?=
bench-gpu:
	GPU_PYTHON="$(GPU_PYTHON)" GPU_SITE="$(GPU_SITE)" WHEELS="$(WHEELS)" sh benchmarks/bench_gpu.sh $(ARGS)
	# The docs' cost chart reads the GPU section just written (PIL only).
	-$(GPU_PYTHON) -m benchmarks.charts

# The wheels the GPU machine lacks, for Python 3.12 on manylinux x86_64, into wheelhouse/ (needs network).
# Its image already has torch, triton, transformers, huggingface-hub, safetensors, regex, numpy,
# pillow, filelock, requests, nvidia-ml-py and the rest of diffusers' needs (importlib_metadata is for
# Python < 3.8 only): diffusers alone is missing. Pure-python wheels come as py3-none-any.
WHEELHOUSE_PACKAGES ?= diffusers==0.42.1
wheelhouse:
	rm -rf wheelhouse && mkdir -p wheelhouse
	$(PYTHON) -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
		--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
		--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --dest wheelhouse $(WHEELHOUSE_PACKAGES)
	ls wheelhouse

# The documentation site (mkdocs.yml, pages in docs/), built into site/ with --strict: a broken link, a
# missing page or an API reference that does not resolve fails the build. `make docs-strict` is the
# same build for CI; the examples in the pages are run by tests/test_docs_examples.py (`make test`).
# MkDocs and its plugins come with the lock (the `docs` extra).
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir site

docs-strict: docs

# The demo's sheets shown in README.md, on the docs' front page and in docs/builtin-mmdit.md: run the
# demo on each built-in model, copy its sheet.
docs-sheet: $(STAMP)
	$(PY) -m sgfast demo --out outputs/demo
	cp outputs/demo/sheet.png docs/demo.png
	$(PY) -m sgfast demo --model default-mmdit --out outputs/demo-mmdit
	cp outputs/demo-mmdit/sheet.png docs/demo-mmdit.png

# The charts of docs/img/ (guided/plain cost against the peers, serving latency), drawn from the
# tables the benchmark commands write into benchmarks/RESULTS.md.
docs-charts: $(STAMP)
	$(PY) -m benchmarks.charts
