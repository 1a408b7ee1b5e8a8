"""The kernels as the GPU will run them, checked without a GPU: one forward and one backward launch
compiled for sm_90 (in a subprocess: the compile needs Triton's real JIT, not the interpreter the
other tests use) must use tensor cores, spill nothing and fill 90% of an H100's SMs at batch 1."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

REPO = Path(__file__).resolve().parents[1]

SCRIPT = """
import json
from benchmarks.kernel_cases import default_cases
from benchmarks.kernels import record
case = next(c for c in default_cases((1,)) if c.arch == "sd15" and c.layer == "up_blocks.2")
print(json.dumps([record(kernel, case, "fp16", "sm_90") for kernel in ("forward", "backward")]))
"""


def test_sm90_launches_use_tensor_cores_without_spills():
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    records = json.loads(done.stdout.strip().splitlines()[-1])
    assert [r["kernel"] for r in records] == ["forward", "backward"]
    for r in records:
        assert r["target"] == "sm_90" and r["sms"] == 132
        assert r["tensor_core_ops"] > 0, r
        assert r["spill_bytes"] == 0, r
        assert r["programs"] >= 0.9 * r["sms"], r
        assert 0 < r["registers"] <= 255, r
        assert r["keys_padded"] == 80  # 77 keys as a 64 + 16 tile pair
