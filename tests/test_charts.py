"""The docs' charts read their bars from RESULTS.md's tables (benchmarks/charts.py), and the site's
results page is RESULTS.md with its links into docs/ made relative to the page (docs/hooks.py)."""

import importlib.util
from pathlib import Path

import pytest
from PIL import Image

from benchmarks import charts

REPO = Path(__file__).resolve().parent.parent

RESULTS = """# Benchmark results

## Serving

| model | SLO: p95 <= ms | other |
|---|---|---|
| tiny | 3185 | - |

| model | scheduler | offered req/s | p50 ms | p95 ms |
|---|---|---|---|---|
| tiny | request | 0.75 | 2479 | 7173 |
| tiny | iteration | 1.51 | 4243 | 10937 |

## FLOPs on the real architectures (`python -m benchmarks.flops`)

SD15 UNet (859.52 M params)

| step | TFLOP | x plain |
|---|---|---|
| sgfast fast: move + keep shape + keep appearance | 2.226 | 1.386 |
| diffusers Attend-and-Excite guided step (maps at 16x16) | 2.854 | 1.777 |

SDXL UNet (2567.46 M params)

| step | TFLOP | x plain |
|---|---|---|
| sgfast fast: move + keep shape + keep appearance | 19.169 | 1.418 |
| diffusers Attend-and-Excite guided step (maps at 32x32) | 25.918 | 1.917 |

## Speed, memory and FLOPs (`make bench`)

### CPU, 2026-11-25

**tiny**

| row | guided / plain | image / plain image |
|---|---|---|
| diffusers Attend-and-Excite | 9.99 | 9.99 |

**default** (the shipped model)

| row | guided / plain | image / plain image |
|---|---|---|
| diffusers plain (no guidance) | n/a | 1.00 |
| diffusers Attend-and-Excite | 2.61 | 4.89 |
| sgfast fast: move + keep shape + keep appearance | 2.14 | 1.61 |

| row | per image: UNet fwd / with grad / backward |
|---|---|
| diffusers plain (no guidance) | 20 / 0 / 0 |
| diffusers Attend-and-Excite | 89 / 69 / 56 (10 guided steps) |
| sgfast fast: move + keep shape + keep appearance | 32 / 12 / 12 (12 guided steps) |

## GPU (`make bench-gpu`)

`make bench-gpu`, 2026-11-30 17:28 UTC: NVIDIA H200 (132 SMs), torch 2.11.0

**sd15_image**

| row | steps | s/image | x plain |
|---|---|---|---|
| diffusers plain | 50 | 2.53 | 1.00 |
| sgfast fast: move + keep (edited) | 50 | 6.97 | 2.76 |
| diffusers Attend-and-Excite | 50 | 12.23 | 4.84 |
"""


def test_cost_measures_are_the_tables_cells():
    measures = {label: (source, values) for label, source, values in charts.cost_measures(RESULTS)}
    assert measures["FLOPs of a guided step, SD1.5 512px"][1] == {"sgfast": 1.386, "Attend-and-Excite": 1.777}
    assert measures["FLOPs of a guided step, SDXL 1024px"][1] == {"sgfast": 1.418, "Attend-and-Excite": 1.917}
    # The built-in model's rows, not the tiny model's above them; passes = forward + backward over plain's 20.
    assert measures["UNet passes per image (forward + backward)"][1] == {"sgfast": 44 / 20, "Attend-and-Excite": 145 / 20}
    assert measures["CPU time of a guided step"][1] == {"sgfast": 2.14, "Attend-and-Excite": 2.61}
    assert measures["CPU time of an image"][1] == {"sgfast": 1.61, "Attend-and-Excite": 4.89}
    assert "2026-11-25" in measures["CPU time of an image"][0]
    source, values = measures["GPU time of a 50-step SD1.5 image"]
    assert values == {"sgfast": 2.76, "Attend-and-Excite": 4.84}
    assert "NVIDIA H200" in source and "2026-11-30" in source


def test_serving_rows_and_slos():
    rows, slos = charts.serving_rows(RESULTS)
    assert slos == {"tiny": 3185.0}
    assert rows == [
        {"model": "tiny", "scheduler": "request", "rate": 0.75, "summary": {"p95_ms": 7173.0, "p50_ms": 2479.0}},
        {"model": "tiny", "scheduler": "iteration", "rate": 1.51, "summary": {"p95_ms": 10937.0, "p50_ms": 4243.0}},
    ]


def test_a_missing_row_or_section_is_an_error_naming_it():
    with pytest.raises(KeyError, match="no row 'diffusers Attend-and-Excite'"):
        charts.cost_measures(RESULTS.replace("| diffusers Attend-and-Excite | 50 |", "| someone else | 50 |"))
    with pytest.raises(KeyError, match="no section '## Serving'"):
        charts.serving_rows(RESULTS.replace("## Serving", "## Other"))


def test_the_committed_results_draw_both_charts(tmp_path):
    charts.main(["--out", str(tmp_path)])
    for name in ("cost.png", "serve_load.png"):
        with Image.open(tmp_path / name) as image:
            assert image.width > 600 and image.height > 300
            assert len(image.convert("RGB").getcolors(1 << 16) or range(1 << 16)) > 2  # not a blank canvas


def test_results_page_links_into_docs_are_relative_to_the_page():
    spec = importlib.util.spec_from_file_location("docs_hooks", REPO / "docs" / "hooks.py")
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    text = "see [docs/testing.md](../docs/testing.md) and ![plot](../docs/img/serve_load.png); `../docs/x` stays"
    assert hooks.results_page_text(text) == "see [docs/testing.md](testing.md) and ![plot](img/serve_load.png); `../docs/x` stays"
