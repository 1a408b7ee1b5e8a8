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


JOINT_SCRIPT = """
import json
from benchmarks.kernel_cases import joint_cases
from benchmarks.kernels import record_joint
sd3, flux = joint_cases((1,))
kernels = ("forward_lse_given", "forward_lse_computed", "backward_dq", "backward_dk_image", "backward_dk_text")
print(json.dumps([record_joint(kernel, case, "fp16", "sm_90") for case in (sd3, flux) for kernel in kernels]))
"""


def test_sm90_joint_attention_launches_use_tensor_cores_without_spills():
    """The MMDiT joint op's five launches at SD3-medium's and FLUX.1-dev's 1024px shapes (4096 image
    tokens; 333 and 512 text tokens; 24 heads of 64 and 128)."""
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    done = subprocess.run([sys.executable, "-c", JOINT_SCRIPT], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    records = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(records) == 10
    for r in records:
        assert r["target"] == "sm_90" and r["sms"] == 132
        assert r["tensor_core_ops"] > 0, r
        assert r["spill_bytes"] == 0, r
        assert r["programs"] >= 0.9 * r["sms"], r
        assert 0 < r["registers"] <= 255, r
    by_kernel = {(r["layer"].split()[0], r["kernel"]): r for r in records}
    # The normaliser's forward is a Q K^T pass: at least 4 programs per SM to hide its latency.
    assert by_kernel["sd3-medium", "forward_lse_computed"]["programs"] >= 4 * 132
    # The backward's dense passes: one program per (32-row block, head).
    assert by_kernel["flux-dev", "backward_dq"]["grid"] == [128, 24, 1]
    assert by_kernel["sd3-medium", "backward_dk_text"]["grid"] == [11, 24, 1]  # 333 text keys


def test_results_show_bf16_only_where_it_differs_from_fp16():
    from benchmarks.kernels import shown

    base = dict(kernel="forward", layer="l", batch=1, target="sm_90", registers=100, spill_bytes=0, shared_bytes=1024,
                tensor_core_ops=8, programs=16)
    same = {**base, "dtype": "bf16"}
    other = {**base, "dtype": "bf16", "layer": "m", "registers": 120}
    other_fp16 = {**base, "dtype": "fp16", "layer": "m"}
    rows = [{**base, "dtype": "fp16"}, same, other_fp16, other]
    assert shown(rows) == [rows[0], other_fp16, other]
