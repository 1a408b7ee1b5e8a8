"""Ops and host synchronisations of a guided step, counted through the public API (benchmarks.ops):
exact counts, asserted as upper bounds."""

import pytest
import torch

from benchmarks.ops import BATCH_PROMPTS, GuidedCalls, batch_edits, call_kwargs, edits_of, energy_ops, per_step, rows_for
from benchmarks.models import PROMPT
from sgfast import SelfGuidancePipeline, move, resize
from sgfast.testing import tiny_pipeline, tiny_sdxl_pipeline


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("build", [tiny_pipeline, tiny_sdxl_pipeline], ids=["sd-ddim", "sdxl-euler"])
@pytest.mark.parametrize("form", ["split", "batched"])
def test_a_guided_step_synchronises_no_more_than_the_schedulers_step(build, form):
    # Per step (4-step call - 2-step call, halved), every step guided with the paper's keep terms: the
    # syncs of a guided step are those of diffusers' own plain step (its scheduler's), no more.
    pipe = build()
    _, plain_syncs = per_step(lambda n: pipe(PROMPT, num_inference_steps=n, **call_kwargs()))
    sg = SelfGuidancePipeline.from_pipe(pipe, mode="fast", settings="paper", guided_step=form)
    ops, syncs = per_step(GuidedCalls(sg, PROMPT, edits_of("move_keep")))
    assert ops > 0 and syncs <= plain_syncs


def test_the_energies_cost_the_same_ops_whatever_the_edits_words_and_batch():
    # Energies and their backward: one prompt with move + keep terms + resize against four prompts
    # with four edits (every kind of term in both): the same op count.
    pipe = tiny_pipeline()
    sg = SelfGuidancePipeline.from_pipe(pipe, mode="fast", settings="paper")
    one = energy_ops(sg, PROMPT, [move("circle", dx=0.25), resize("square", scale=1.5, keep_others=False)])
    four = energy_ops(sg, BATCH_PROMPTS, batch_edits())
    assert one == four > 0


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_op_targets_on_the_real_architectures(arch):
    # SD1.5 (6 captured layers) and SDXL (30): guided move + keep terms <= 3.3x a plain step's ops,
    # move alone <= 3.2x, the energies (forward and backward) <= 0.15x, also for a batch of four
    # prompts with different edits; no more host syncs than the plain step.
    rows = {r["row"]: r for r in rows_for(arch, forms=("split",))}
    plain = rows["diffusers plain CFG step"]
    move_row, keep_row = rows["sgfast guided (split), move"], rows["sgfast guided (split), move + keep terms"]
    assert move_row["x_plain"] <= 3.2 and keep_row["x_plain"] <= 3.3
    assert keep_row["energy_x_plain"] <= 0.15
    assert rows["energies alone: batch of four prompts, four edits"]["energy_x_plain"] <= 0.15
    assert move_row["syncs"] <= plain["syncs"] and keep_row["syncs"] <= plain["syncs"]
