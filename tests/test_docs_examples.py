"""Every fenced ```python block of README.md and docs/*.md runs, so that the examples stay true.

A page's blocks run in order in one namespace (a later block may use an earlier one's names), in a
scratch folder holding a `photo.png` (a red circle and a blue square, 64 x 64). Checkpoint paths
written as "path/to/<name>" load the tiny offline pipeline of the same kind instead (sgfast.testing),
with the scheduler that checkpoint ships: SD 1.x's PNDM, SDXL's Euler. In the default run every call
takes at most FEW_STEPS inference steps (the examples' own step counts run under `-m slow`, as
`test_page_examples_run[<page>-as written]`); nothing else is stood in for.

Markers, an HTML comment on the line before a block's fence:
- `<!-- not run: why -->`: the block is not run (it needs a GPU, a server, a checkpoint of a kind the
  tiny pipelines do not cover); `test_blocks_not_run_say_why` lists them with their reasons.
- `<!-- slow -->`: the page's blocks run under `-m slow` only (the built-in model's longer examples).
"""

import re
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md"] + sorted((REPO / "docs").glob("*.md"))
FENCE = re.compile(r"^```python\b.*$")
MARKER = re.compile(r"^<!--\s*(not run|slow)\s*(?::\s*(.*?))?\s*-->\s*$")


def blocks(page):
    """[(first line number, code, marker, reason)] of the page's top-level ```python blocks."""
    lines = page.read_text().splitlines()
    found, i = [], 0
    while i < len(lines):
        if FENCE.match(lines[i]):
            start = i
            end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), None)
            if end is None:
                raise ValueError(f"{page.name}:{start + 1}: a ```python block that never closes")
            before = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
            marker = MARKER.match(before)
            kind, reason = (marker.group(1), marker.group(2) or "") if marker else (None, "")
            found.append((start + 1, "\n".join(lines[start + 1:end]) + "\n", kind, reason))
            i = end
        i += 1
    return found


FEW_STEPS = 8  # enough for the paper's schedule and the built-in model's (a resize guides from step 5) to guide a step


def page_params():
    """Each page with a block to run: capped at FEW_STEPS (slow if a block is), and as written (slow)."""
    params = []
    for page in PAGES:
        found = blocks(page)
        if not any(kind != "not run" for _, _, kind, _ in found):
            continue
        slow = any(kind == "slow" for _, _, kind, _ in found)
        params.append(pytest.param(page, FEW_STEPS, id=page.name, marks=[pytest.mark.slow] if slow else []))
        params.append(pytest.param(page, None, id=f"{page.name}-as written", marks=[pytest.mark.slow]))
    return params


# ---------------------------------------------------------------------------------------------------
# The stand-ins: tiny pipelines for "path/to/..." checkpoints, and a photo.
# ---------------------------------------------------------------------------------------------------


def tiny_checkpoint(kind):
    from diffusers import PNDMScheduler, StableDiffusionXLImg2ImgPipeline

    from sgfast.testing import tiny_pipeline, tiny_sdxl_components, tiny_sdxl_pipeline

    if kind == "sdxl":
        return tiny_sdxl_pipeline()
    if kind == "sdxl-img2img":  # the refiner's class, on the base's tiny parts
        refiner = StableDiffusionXLImg2ImgPipeline(**tiny_sdxl_components(), add_watermarker=False)
        refiner.set_progress_bar_config(disable=True)
        return refiner
    pipe = tiny_pipeline()
    pipe.scheduler = PNDMScheduler.from_config(pipe.scheduler.config, skip_prk_steps=True)  # as SD 1.5 ships
    return pipe


@pytest.fixture
def placeholder_checkpoints(monkeypatch):
    """`from_pretrained("path/to/...")` of SD and SDXL pipelines gives the tiny pipeline of that kind."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    kinds = ((StableDiffusionPipeline, "sd"), (StableDiffusionXLPipeline, "sdxl"), (StableDiffusionXLImg2ImgPipeline, "sdxl-img2img"))
    for cls, kind in kinds:
        original = cls.from_pretrained

        def from_pretrained(path, *args, _original=original, _kind=kind, **kwargs):
            if isinstance(path, str) and path.startswith("path/to/"):
                return tiny_checkpoint(_kind)
            return _original(path, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", staticmethod(from_pretrained))


def cap_steps(monkeypatch, most):
    """Every pipeline call and inversion takes at most `most` inference steps."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    from sgfast import SelfGuidancePipeline

    methods = [(SelfGuidancePipeline, "__call__", 50), (SelfGuidancePipeline, "invert", 50), (SelfGuidancePipeline, "trace_image", 50)]
    methods += [(cls, "__call__", 50) for cls in (StableDiffusionPipeline, StableDiffusionXLPipeline, StableDiffusionXLImg2ImgPipeline)]
    for cls, name, default in methods:
        original = getattr(cls, name)

        def capped(self, *args, _original=original, _default=default, **kwargs):
            kwargs["num_inference_steps"] = min(kwargs.get("num_inference_steps", _default), most)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, name, capped)


def write_photo(path, size=64):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), (240, 240, 240))
    draw = ImageDraw.Draw(image)
    draw.ellipse((8, 30, 28, 50), fill=(220, 30, 30))
    draw.rectangle((38, 10, 56, 28), fill=(30, 60, 220))
    image.save(path)


# ---------------------------------------------------------------------------------------------------
# The tests.
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("page, most_steps", page_params())
def test_page_examples_run(page, most_steps, tmp_path, monkeypatch, placeholder_checkpoints):
    if most_steps is not None:
        cap_steps(monkeypatch, most_steps)
    monkeypatch.chdir(tmp_path)
    write_photo(tmp_path / "photo.png")
    namespace = {"__name__": f"docs_example_{page.stem}"}
    for line, code, kind, _ in blocks(page):
        if kind == "not run":
            continue
        try:
            exec(compile(code, f"{page.relative_to(REPO)}:{line}", "exec"), namespace)
        except Exception as error:
            raise AssertionError(f"the example at {page.relative_to(REPO)}:{line} failed: {error!r}") from error


def test_blocks_not_run_say_why():
    """Each block left out says why; the list is reported as a warning, so that it shows in every run."""
    left_out = [(page, line, reason) for page in PAGES for line, _, kind, reason in blocks(page) if kind == "not run"]
    missing = [f"{page.relative_to(REPO)}:{line}" for page, line, reason in left_out if not reason]
    assert not missing, f"blocks marked 'not run' without a reason: {missing}"
    run = sum(1 for page in PAGES for _, _, kind, _ in blocks(page) if kind != "not run")
    assert run > 0
    warnings.warn(
        f"docs examples: {run} run, {len(left_out)} not run: "
        + "; ".join(f"{page.relative_to(REPO)}:{line} ({reason})" for page, line, reason in left_out),
        UserWarning,
    )


def test_markers_are_read(tmp_path):
    """The parser finds blocks, their markers and reasons, and leaves other languages alone."""
    page = tmp_path / "page.md"
    page.write_text(
        "text\n\n```python\na = 1\n```\n\n<!-- not run: needs a GPU -->\n```python title=\"x\"\nb = 2\n```\n"
        "<!-- slow -->\n\n```python\nc = 3\n```\n```bash\nls\n```\n"
    )
    assert blocks(page) == [(3, "a = 1\n", None, ""), (8, "b = 2\n", "not run", "needs a GPU"), (13, "c = 3\n", "slow", "")]


@pytest.mark.parametrize("page", ["README.md", "benchmarks/RESULTS.md"])
def test_links_outside_the_site_reach_files(page):
    """README.md and RESULTS.md are read on their own, outside the site's --strict build: each relative
    link and image of theirs names a file of the repository."""
    path = REPO / page
    targets = re.findall(r"\]\(([^)\s]+)\)", path.read_text())
    relative = [t.split("#")[0] for t in targets if "://" not in t and not t.startswith("#")]
    assert relative, f"{page} links nowhere"
    missing = [t for t in relative if not (path.parent / t).exists()]
    assert not missing, f"{page} links to files that do not exist: {missing}"
