#!/bin/sh
# `make bench-gpu` without make: installs what the GPU machine lacks into a scratch folder and runs
# `python -m benchmarks.gpu` with the machine's own python3, torch and triton.
#
#   [GPU_PYTHON=python3] [WHEELS=wheelhouse] [GPU_SITE=outputs/gpu-site] sh benchmarks/bench_gpu.sh [--quick ...]
#
# WHEELS: a folder of wheels from `make wheelhouse` (installed with no network, no dependencies).
# sgfast itself is installed there too: setup.py copies the top-level kernels/ folder's sources into
# sgfast.kernels, as a wheel holds them.
set -e
cd "$(dirname "$0")/.."
repo=$(pwd)
python=${GPU_PYTHON:-python3}
site=${GPU_SITE:-outputs/gpu-site}
start=$(date +%s)
rm -rf "$site" && mkdir -p "$site" && site=$(cd "$site" && pwd)
pip_install="$python -m pip install --quiet --disable-pip-version-check --no-index --no-deps --no-compile --target $site"
if [ -n "$WHEELS" ]; then
    $pip_install "$WHEELS"/*.whl
fi
if ! $pip_install --no-build-isolation . ; then
    # Without a usable setuptools: the same layout by hand.
    echo "[bench-gpu] pip could not install sgfast; copying it (sgfast/, and kernels/*.py into sgfast/kernels/)"
    rm -rf "$site/sgfast" && cp -R sgfast "$site/sgfast" && cp kernels/*.py "$site/sgfast/kernels/"
fi
echo "[bench-gpu] install: $(($(date +%s) - start)) s"
cd "$site"
# Offline: nothing may wait on a model hub (every model here is built from configs).
HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH="$site:$repo${PYTHONPATH:+:$PYTHONPATH}" \
    exec "$python" -m benchmarks.gpu "$@"
