"""`python -m benchmarks.gpu`: the dry run goes through every phase on the CPU and writes records
with finite figures; the budget and --quick skip phases; the RESULTS.md section is replaced, not
duplicated, and the committed RESULTS.md is left alone."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import gpu

REPO = Path(__file__).resolve().parents[1]
PHASES = [name for name, *_ in gpu.PHASES]

STEP_ROW = [
    "plain_step_ms", "guided_step_ms", "guided_over_plain", "plain_peak_mib", "guided_peak_mib", "peak_ratio",
    "plain_extra_mib", "guided_extra_mib",
]
FORM_ROW = ["plain_step_ms", "guided_step_ms", "guided_over_plain", "plain_peak_mib", "guided_peak_mib", "peak_ratio"]
# Fields each phase's records must carry, as finite numbers (or booleans / strings where named).
NUMBERS = {
    "kernels_correctness": ["err_sums", "err_maps", "err_dq", "tol", "tol_dq", "head_dim"],
    "kernel_timing": ["triton_us", "torch_us", "speedup", "bytes_moved", "floor_us", "pct_roofline",
                      "triton_eager_us", "torch_eager_us"],
    "kernel_variants": ["forward_us", "backward_us", "maps_error", "dq_error", "programs_forward", "block_n"],
    "sd15_image": ["image_s", "images_per_s", "peak_mib"],
    "sdxl_image": ["image_s", "images_per_s", "peak_mib"],
    "sd15_guided_steps": FORM_ROW,
    "sdxl_step": FORM_ROW,
    "cuda_graphs": ["eager_ms"],
    "sd15_compile": ["first_call_s", "step_ms", "plain_eager_step_ms", "guided_over_plain"],
}
WAY_ROW = ["step_ms", "peak_mib", "over_split", "noise_rel_diff", "grad_rel_diff"]


def finite_positive(record, keys):
    for key in keys:
        value = record.get(key)
        assert isinstance(value, (int, float)) and math.isfinite(value) and value >= 0, (key, value, record)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-dry-run")
    committed = (REPO / "benchmarks" / "RESULTS.md").read_text()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu", "--dry-run", "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert (REPO / "benchmarks" / "RESULTS.md").read_text() == committed
    return json.loads((out / "gpu.json").read_text()), (out / "RESULTS.md").read_text(), proc.stdout


def test_dry_run_every_phase_has_records(dry_run):
    report, _, stdout = dry_run
    assert list(report["phases"]) == PHASES
    for name, phase in report["phases"].items():
        assert phase["status"] == "ok", (name, phase["note"])
        assert phase["records"], name
        assert math.isfinite(phase["seconds"]) and phase["seconds"] > 0
        assert f"{name}: ok in" in stdout
        for record in phase["records"]:
            if name == "sd15_step":
                finite_positive(record, WAY_ROW if "way" in record else STEP_ROW)
            else:
                finite_positive(record, NUMBERS[name])
    phases = report["phases"]
    assert all(r["ok"] and r["deterministic"] for r in phases["kernels_correctness"]["records"])
    layouts = {(r["dtype"], r["layout"]) for r in phases["kernels_correctness"]["records"]}
    assert layouts == {(d, layout) for d in ("fp32", "fp16", "bf16") for layout in gpu.LAYOUTS}
    assert {(r["dtype"], r["kernel"]) for r in phases["kernel_timing"]["records"]} == {
        (d, k) for d in ("fp16", "bf16") for k in ("forward", "backward")
    }
    # The two ways of the guided step compute the same thing.
    ways = [r for r in phases["sd15_step"]["records"] if "way" in r]
    assert {r["way"] for r in ways} == {"split", "batched"}
    assert all(r["noise_rel_diff"] < 1e-3 and r["grad_rel_diff"] < 1e-3 for r in ways)
    assert {r["mode"] for r in phases["sd15_step"]["records"]} == {"reference", "fast"}
    assert report["total_s"] > 0 and report["dry_run"]


def test_dry_run_headline_phases_come_first_and_cover_forms_graphs_and_sdxl(dry_run):
    report, results, _ = dry_run
    phases = report["phases"]
    assert PHASES[:5] == ["sd15_guided_steps", "sd15_image", "sd15_compile", "sdxl_step", "sdxl_image"]
    # The step rows: eager against diffusers, graphed against sgfast's own graphed plain step; the
    # "auto" rows measured both forms and ran the faster one.
    for name in ("sd15_guided_steps", "sdxl_step"):
        for r in phases[name]["records"]:
            assert r["plain"] == ("sgfast, CUDA graph" if r["cuda_graph"] else "diffusers")
            if r["form"] == "auto":
                assert r["auto_source"] == "measured" and r["auto_split_ms"] > 0 and r["auto_batched_ms"] > 0
                faster = "split" if r["auto_split_ms"] <= r["auto_batched_ms"] else "batched"
                assert r["form_used"] == faster
            else:
                assert r["form_used"] == r["form"]
    steps = phases["sd15_guided_steps"]["records"]
    assert {(r["form"], r["cuda_graph"]) for r in steps} >= {("auto", False), ("auto", True)}
    assert all(isinstance(r["step_met"], bool) and r["step_target"] == 1.5 for r in steps if r["cuda_graph"])
    assert {r["pipeline"] for r in phases["sdxl_step"]["records"]} == {"StableDiffusionXLPipeline"}
    # The images: plain, edited and Attend-and-Excite eager, plain and edited graphed, each with its peak
    # and energy note; ratios against the plain row of its own group, with the targets where they apply.
    images = {r["row"]: r for r in phases["sd15_image"]["records"]}
    assert set(images) == {
        "diffusers plain", "sgfast fast: move + keep (edited)", "diffusers Attend-and-Excite", "sgfast plain, CUDA graph",
        "sgfast fast: move + keep (edited), CUDA graph",
    }
    assert all(r["energy_note"] and r["peak_mib"] > 0 for r in images.values())
    graphed = images["sgfast fast: move + keep (edited), CUDA graph"]
    assert graphed["group"] == "CUDA graph" and (graphed["time_target"], graphed["peak_target"]) == (1.3, 1.3)
    assert images["sgfast fast: move + keep (edited)"]["time_target"] == 1.8
    assert math.isfinite(images["diffusers Attend-and-Excite"]["over_plain"])
    sdxl = {r["row"] for r in phases["sdxl_image"]["records"]}
    assert sdxl == set(images) - {"diffusers Attend-and-Excite"}
    assert "auto: split ms" in results and "peak x plain" in results


def test_dry_run_writes_the_gpu_section_once(dry_run):
    _, results, _ = dry_run
    assert results.count("\n## GPU") == 1
    section = results[results.index("\n## GPU") :]
    for name in PHASES:
        assert f"| {name} | ok |" in section
    assert "**kernel_timing**" in section and "% of roofline" in section
    # The sections after it in the committed file are still there (the copy keeps the whole file).
    assert "## Per-step regression benchmarks" in results


def test_results_section_replaced_or_appended(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text("# Benchmark results\n\n## A\n\na\n\n## GPU (`make bench-gpu`)\n\nold\n\n## B\n\nb\n")
    gpu.write_results_section(path, "## GPU (`make bench-gpu`)\n\nnew\n")
    text = path.read_text()
    assert "old" not in text and text.count("## GPU") == 1 and text.index("new") < text.index("## B")
    assert "## A\n\na" in text and "## B\n\nb" in text
    other = tmp_path / "OTHER.md"
    other.write_text("# Benchmark results\n\n## A\n\na\n")
    gpu.write_results_section(other, "## GPU\n\nnew\n")
    assert other.read_text().endswith("## GPU\n\nnew\n")


def test_budget_and_quick_skip_phases(tmp_path):
    status = gpu.main(["--dry-run", "--quick", "--budget-s", "0", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "gpu.json").read_text())
    assert status == 0 and list(report["phases"]) == PHASES
    slow = {name for name, _, is_slow, _ in gpu.PHASES if is_slow}
    assert slow == {"sd15_image", "sd15_compile", "sdxl_step", "sdxl_image"}
    for name, phase in report["phases"].items():
        assert phase["status"] == "skipped" and not phase["records"]
        assert ("--quick" in phase["note"]) == (name in slow)
    assert "| sd15_image | skipped | 0.0 | --quick |" in (tmp_path / "RESULTS.md").read_text()


def test_hbm_bandwidth_by_device_name():
    assert gpu.hbm_bandwidth("NVIDIA H100 80GB HBM3")[0] == 3.35e12
    assert gpu.hbm_bandwidth("NVIDIA H200")[0] == 4.8e12
    assert "unknown" in gpu.hbm_bandwidth("NVIDIA A100-SXM4-80GB")[1]


def test_phases_fail_alone_and_the_budget_stops_a_long_one(tmp_path, monkeypatch):
    import time
    from types import SimpleNamespace

    args = SimpleNamespace(budget_s=600.0, quick=False, dry_run=True, argv=[])
    bench = gpu.Bench(args, SimpleNamespace(device="cpu"), tmp_path / "gpu.json", tmp_path / "RESULTS.md")

    def broken(bench, records):
        records.append(dict(x=1.0))
        raise RuntimeError("boom")

    def endless(bench, records):
        while True:
            time.sleep(0.02)

    monkeypatch.setattr(gpu, "HARD_STOP_GRACE_S", 0.0)
    bench.run("broken", broken)
    bench.run("fine", lambda bench, records: records.append(dict(y=2.0)))
    assert bench.exit_status() == 2
    bench.args.budget_s = bench.elapsed() + 1.5  # the budget runs out inside the next phase
    bench.run("endless", endless)
    bench.run("after", lambda bench, records: None, need_s=1.0)
    phases = json.loads((tmp_path / "gpu.json").read_text())["phases"]
    assert phases["broken"]["status"] == "failed" and "boom" in phases["broken"]["note"]
    assert phases["broken"]["records"] == [dict(x=1.0)]
    assert phases["fine"]["status"] == "ok"
    assert phases["endless"]["status"] == "partial" and "hard stop" in phases["endless"]["note"]
    assert phases["after"]["status"] == "skipped"

    def mismatch(bench, records):
        raise gpu.KernelMismatch("1 of 1 cases outside tolerance")

    bench.args.budget_s = bench.elapsed() + 600.0
    bench.run("kernels", mismatch)
    assert bench.exit_status() == 1
