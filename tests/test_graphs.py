"""CUDA graphs of the guided evaluation (sgfast.graphs): refusals, and the static-buffer path run as a
dry run on the CPU: two calls with different prompts, edits and seeds replay the first call's
entries and give what the eager steps give."""

import pytest
import torch

from sgfast import SelfGuidancePipeline, move, resize
from sgfast.graphs import StepGraphs
from sgfast.testing import tiny_pipeline

PROMPT = "a red circle and a blue square"


def test_cuda_graph_is_refused_where_it_cannot_work():
    pipe = tiny_pipeline()
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="cuda_graph=True needs a CUDA GPU, and this machine has none"):
            SelfGuidancePipeline.from_pipe(pipe, mode="fast", cuda_graph=True)
    with pytest.raises(ValueError, match="cuda_graph=True needs mode='fast'"):
        SelfGuidancePipeline.from_pipe(pipe, cuda_graph=True)
    with pytest.raises(ValueError, match="cuda_graph=True and compile=True exclude each other"):
        SelfGuidancePipeline.from_pipe(pipe, mode="fast", compile=True, cuda_graph=True)
    with pytest.raises(ValueError, match="guided_step must be one of"):
        SelfGuidancePipeline.from_pipe(pipe, guided_step="twice")


@pytest.mark.parametrize("form", ["split", "batched"])
def test_graph_buffers_replay_what_the_eager_steps_compute(form):
    pipe = tiny_pipeline()
    eager = SelfGuidancePipeline.from_pipe(pipe, mode="fast", guided_step=form)
    graphed = SelfGuidancePipeline.from_pipe(pipe, mode="fast", guided_step=form)
    graphed._graphs = StepGraphs.for_pipeline(pipe, "fast", dry_run=True)
    calls = [(PROMPT, [move("circle", dx=0.25, weight=8.0)], 0), ("a blue square and a red circle", [resize("square", 1.5)], 1)]
    for prompt, edits, seed in calls:
        runs = [sg(prompt, edits=edits, num_inference_steps=4, generator=torch.Generator().manual_seed(seed),
                   output_type="latent") for sg in (eager, graphed)]
        torch.testing.assert_close(runs[1].images, runs[0].images, rtol=1e-5, atol=1e-6)
        assert [s for s, _ in runs[1].energies] == [s for s, _ in runs[0].energies]
        torch.testing.assert_close(torch.tensor([e for _, e in runs[1].energies]),
                                   torch.tensor([e for _, e in runs[0].energies]), rtol=1e-5, atol=1e-7)
    # One entry per kind of step (the edits' structure is part of the key), reused by the second call.
    assert graphed._graphs.captures == len(graphed._graphs.entries) <= 4


@pytest.mark.compile
def test_the_guided_evaluation_compiles_whole_with_its_gradient():
    # The same evaluation function the CUDA graph captures, compiled with fullgraph=True on the CPU:
    # UNet passes, maps, energy, gradient to the latents, noise combination, no graph break.
    import torch._dynamo

    from sgfast import guided

    pipe = tiny_pipeline()
    sg = SelfGuidancePipeline.from_pipe(pipe, mode="fast")
    sg._capture.can_stop_early = False
    seen = {}
    real = guided.GuidedCall.evaluate

    def spy(self, *args, **kwargs):
        seen.setdefault("call", (self, args, kwargs))
        return real(self, *args, **kwargs)

    guided.GuidedCall.evaluate = spy
    try:
        sg(PROMPT, edits=[move("circle", dx=0.25)], num_inference_steps=2, guidance_schedule=[True, False],
           generator=torch.Generator().manual_seed(0), output_type="latent")
    finally:
        guided.GuidedCall.evaluate = real
    call, args, kwargs = seen["call"]
    torch._dynamo.reset()
    with torch._dynamo.config.patch(trace_autograd_ops=True), sg.capture():
        expected = real(call, *args, **kwargs)
        compiled = torch.compile(lambda *a: real(call, *a, **kwargs), fullgraph=True, backend="eager")
        got = compiled(*args)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_short_warm_up_call_captures_every_graph_a_longer_call_replays():
    # What make bench-gpu's image rows rely on: a 2-step image (one guided, one plain step) captures
    # the graphs; a 4-step image with the paper's schedule then only replays them.
    pipe = tiny_pipeline()
    sg = SelfGuidancePipeline.from_pipe(pipe, mode="fast", guided_step="split")
    sg._graphs = StepGraphs.for_pipeline(pipe, "fast", dry_run=True)
    trace = {n: sg(PROMPT, num_inference_steps=n, generator=torch.Generator().manual_seed(0), output_type="latent").trace
             for n in (2, 4)}
    for n in (2, 4):
        sg(PROMPT, edits=[move("circle", dx=0.25)], trace=trace[n], num_inference_steps=n, output_type="latent")
        if n == 2:
            captured = sg._graphs.captures
            assert {key[0] for key in sg._graphs.entries} == {"guided", "plain"}
    assert sg._graphs.captures == captured
