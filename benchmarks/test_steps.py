"""Per-step timings with pytest-benchmark, on the tiny pipeline, for regressions across commits.

Not part of `make test` (pytest.ini collects tests/ only). Run and save, then compare later:

    .venv/bin/python -m pytest benchmarks/test_steps.py --benchmark-only --benchmark-autosave
    .venv/bin/python -m pytest benchmarks/test_steps.py --benchmark-only --benchmark-compare

Each benchmark is one denoising step through `sgfast.sampler.denoise` (the loop the pipeline runs):
the plain CFG step, and the guided step of each available mode with the bare move and with the
paper's full move (keep shape + keep appearance). The fast compiled step joins when
SGFAST_BENCH_COMPILE=1 (its first call compiles the UNet, minutes on a CPU).
"""

import os

import pytest
import torch

from benchmarks.models import EDITED_WORD, PROMPT, SEED
from benchmarks.rows import sgfast_support

SUPPORT = sgfast_support()
MODES = [("reference", False)]
if SUPPORT["fast"]:
    MODES.append(("fast", False))
    if SUPPORT["compile"] and os.environ.get("SGFAST_BENCH_COMPILE") == "1":
        MODES.append(("fast", True))
STEPS = 8


@pytest.fixture(autouse=True)
def one_thread():
    # The CPU is shared: one thread keeps timings comparable between runs.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def setup(mode=None, compiled=False):
    from sgfast import SelfGuidancePipeline
    from sgfast.testing import tiny_pipeline
    from sgfast.trace import PromptWords

    pipe = tiny_pipeline(seed=SEED)
    sg = None
    if mode is not None:
        sg = SelfGuidancePipeline.from_pipe(pipe, mode=mode, **({"compile": True} if compiled else {}))
    cond, uncond = pipe.encode_prompt(PROMPT, "cpu", 1, True)
    embeds = torch.cat([uncond, cond])
    pipe.scheduler.set_timesteps(STEPS)
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(SEED))
    words = [PromptWords.from_tokenizer(pipe.tokenizer, PROMPT)]
    return pipe, sg, embeds, latents, words


def test_plain_step(benchmark):
    from sgfast.sampler import denoise

    pipe, _, embeds, latents, _ = setup()
    t = pipe.scheduler.timesteps[1:2]
    benchmark(lambda: denoise(pipe, latents, t, embeds, 7.5, progress=False))


@pytest.mark.parametrize("edit", ["move", "move_keep"])
@pytest.mark.parametrize("mode,compiled", MODES, ids=[m + ("_compiled" if c else "") for m, c in MODES])
def test_guided_step(benchmark, mode, compiled, edit):
    from sgfast import move
    from sgfast.sampler import denoise

    pipe, sg, embeds, latents, words = setup(mode, compiled)
    reference = sg(PROMPT, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(SEED), output_type="latent").trace
    edits = [[move(EDITED_WORD, dx=0.25, keep_others=edit == "move_keep")]]
    pipe.scheduler.set_timesteps(STEPS)
    t = pipe.scheduler.timesteps[1:2]
    energies = []

    def step():
        with sg.capture() as capture:
            return denoise(
                pipe, latents, t, embeds, 7.5, capture=capture, prompt_words=words, edits=edits,
                references=[reference], schedule=[True], energies=energies, progress=False,
            )

    benchmark(step)
    assert energies, "the step was not guided"
