"""The fast guided step agrees with the reference and stores only what the edits read."""

import pytest
import torch

from sgfast import SelfGuidancePipeline, copy_appearance, move, resize
from sgfast.capture import Capture
from sgfast.sampler import edit_selection, guided_energy
from sgfast.testing import tiny_pipeline
from sgfast.trace import PromptWords

PROMPT = "a red circle and a blue square"


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def pipes():
    pipe = tiny_pipeline()
    return SelfGuidancePipeline.from_pipe(pipe, mode="reference"), SelfGuidancePipeline.from_pipe(pipe, mode="fast")


@pytest.fixture(scope="module")
def reference_trace(pipes):
    return pipes[0](PROMPT, num_inference_steps=4, generator=seeded(), output_type="latent").trace


def step_gradient(sg, capture, edits, reference, seed=3, saved=None):
    """Energy and gradient of one guided step at the second of four timesteps."""
    pipe = sg.pipe
    words = [PromptWords.from_tokenizer(pipe.tokenizer, PROMPT)]
    chosen, tokens = edit_selection(edits, words, "cpu")
    embeds = pipe.encode_prompt(PROMPT, "cpu", 1, False)[0]
    pipe.scheduler.set_timesteps(4)
    t = pipe.scheduler.timesteps[1]
    z = torch.randn(1, 4, 16, 16, generator=seeded(seed)).requires_grad_(True)
    hooks = torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x.numel() * x.element_size()) or x, lambda x: x) if saved is not None else None
    with torch.enable_grad(), capture:
        if hooks:
            with hooks:
                _, energy = guided_energy(pipe, capture, z, t, embeds, list(zip(edits, [reference])), words, chosen, tokens)
        else:
            _, energy = guided_energy(pipe, capture, z, t, embeds, list(zip(edits, [reference])), words, chosen, tokens)
        (grad,) = torch.autograd.grad(energy, z)
    return energy, grad


def edit_sets(reference):
    return {
        "move": [[move("circle", dx=0.2)]],
        "resize": [[resize("square", 1.5)]],
        "copy_appearance": [[copy_appearance("circle", reference, "square")]],
    }


@pytest.mark.parametrize("name", ["move", "resize", "copy_appearance"])
def test_fast_gradient_equals_reference(pipes, reference_trace, name):
    reference, fast = pipes
    edits = edit_sets(reference_trace)[name]
    e_ref, g_ref = step_gradient(reference, reference.capture(), edits, reference_trace)
    e_fast, g_fast = step_gradient(fast, fast.capture(), edits, reference_trace)
    assert g_ref.abs().max() > 0
    torch.testing.assert_close(e_fast, e_ref, rtol=1e-6, atol=0)
    assert ((g_fast - g_ref).norm() / g_ref.norm()).item() < 1e-4


def test_fast_saves_less_for_backward(pipes, reference_trace):
    reference, fast = pipes
    edits = [[move("circle", dx=0.2, keep_others=False)]]
    saved_reference, saved_fast = [], []
    step_gradient(reference, Capture(reference.pipe.unet, reference.layers[:1], impl="torch"), edits, reference_trace, saved=saved_reference)
    step_gradient(fast, Capture(fast.pipe.unet, fast.layers[:1], impl="auto", cut_graph=True), edits, reference_trace, saved=saved_fast)
    # Captured at the first decoder layer: the fast graph stops there, the reference one runs to the end.
    assert 0 < sum(saved_fast) < 0.75 * sum(saved_reference)


def test_fast_and_reference_images_agree(pipes, reference_trace):
    reference, fast = pipes
    edits = [move("circle", dx=0.2), resize("square", 1.5)]
    kwargs = dict(num_inference_steps=4, trace=reference_trace, output_type="np", self_guidance_scale=50.0)
    a = reference(PROMPT, edits=edits, **kwargs).images
    b = fast(PROMPT, edits=edits, **kwargs).images
    assert abs(a - b).max() < 1e-4


def test_captured_bytes_are_exactly_the_selected_maps(pipes):
    _, fast = pipes
    pipe = fast.pipe
    words = [PromptWords.from_tokenizer(pipe.tokenizer, PROMPT)]
    embeds = pipe.encode_prompt(PROMPT, "cpu", 1, False)[0]
    z = torch.randn(1, 4, 16, 16, generator=seeded())
    cases = {
        # one word, maps only: 2 layers at 8x8 + 2 at 16x16, fp32
        "move": ([[move("circle", dx=0.2, keep_others=False)]], 1 * (2 * 8 * 8 + 2 * 16 * 16) * 4),
        # move with keep: circle + the other object's words blue, square ("red" describes the circle),
        # and the 64x16x16 features
        "move+keep": ([[move("circle", dx=0.2)]], 3 * (2 * 8 * 8 + 2 * 16 * 16) * 4 + 64 * 16 * 16 * 4),
    }
    for name, (edits, expected) in cases.items():
        chosen, tokens = edit_selection(edits, words, "cpu")
        with fast.capture() as capture, capture.record(*tokens, (16, 16), features=any(e.needs_features for e in edits[0])):
            pipe.unet(z, 500, encoder_hidden_states=embeds)
            assert capture.captured_bytes() == expected, name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_guided_step(dtype):
    # fp16 gradients go through the loss-scaled path; energies stay fp32.
    pipe = tiny_pipeline().to(dtype)
    sg = SelfGuidancePipeline.from_pipe(pipe, mode="fast")
    out = sg(PROMPT, edits=[move("circle", dx=0.2)], num_inference_steps=3, generator=seeded(), output_type="latent")
    assert out.images.dtype == dtype and torch.isfinite(out.images).all()
    assert all(torch.isfinite(torch.tensor(e)) for _, e in out.energies)


def test_unknown_mode(tiny_pipe):
    with pytest.raises(ValueError, match="mode must be one of"):
        SelfGuidancePipeline.from_pipe(tiny_pipe, mode="turbo")


@pytest.mark.compile
def test_compiled_step_gradient_matches_eager(reference_trace):
    eager = SelfGuidancePipeline.from_pipe(tiny_pipeline(), mode="fast")
    compiled = SelfGuidancePipeline.from_pipe(tiny_pipeline(), mode="fast", compile=True)
    for name, edits in edit_sets(reference_trace).items():
        _, g_eager = step_gradient(eager, eager.capture(), edits, reference_trace)
        _, g_compiled = step_gradient(compiled, compiled.capture(), edits, reference_trace)
        assert ((g_compiled - g_eager).norm() / g_eager.norm()).item() < 1e-4, name


@pytest.mark.compile
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_guided_loop_matches_eager(reference_trace, backend):
    # Inductor reorders float32 reductions, so the compiled loop can only be asked to match eager
    # as closely as eager float32 matches the same loop in float64 (its own rounding error),
    # measured here. Measured on the CPU: rounding 1.7e-5, inductor vs eager 2.8e-5 (the same as
    # eager with its initial latents perturbed by one ulp, 2.3e-5), guidance's effect 0.26.
    # Under the plain-L1 energies (before smooth L1) the loop was ill-conditioned: the y of a
    # horizontal move sits on target at step 0 and its L1 subgradient took the sign of float
    # noise, so a 1e-7 nudge of the latents changed the eager step-0 gradient by 37% and inductor
    # "drifted"; the conditioning check below catches a return of that.
    eager = SelfGuidancePipeline.from_pipe(tiny_pipeline(), mode="fast")
    exact = SelfGuidancePipeline.from_pipe(tiny_pipeline().to(torch.float64), mode="fast")
    compiled = SelfGuidancePipeline.from_pipe(tiny_pipeline(), mode="fast", compile=backend)
    kwargs = dict(edits=[move("circle", dx=0.2, keep_others=False)], num_inference_steps=4, trace=reference_trace, output_type="latent", self_guidance_scale=100.0)
    expected = eager(PROMPT, **kwargs).images
    rounding = (expected.double() - exact(PROMPT, latents=reference_trace.latents.double(), **kwargs).images).abs().max().item()
    effect = (expected - eager(PROMPT, **dict(kwargs, self_guidance_scale=0.0)).images).abs().max().item()
    assert 0 < rounding < 1e-3 * effect, (rounding, effect)  # well-conditioned, and guidance matters
    for _ in range(2):  # the second call reuses the compiled graphs
        out = compiled(PROMPT, **kwargs).images
        assert (out - expected).abs().max().item() <= 4 * rounding, ((out - expected).abs().max().item(), rounding)


def test_triton_kernels_in_the_guided_step_match_the_reference(pipes, reference_trace):
    # The fused kernels through the Triton interpreter, inside a real guided step of the tiny UNet.
    reference, fast = pipes
    edits = [[move("circle", dx=0.2, keep_others=False), resize("square", 1.5, keep_others=False)]]
    triton_capture = Capture(fast.pipe.unet, fast.layers, fast.feature_layer, impl="triton", cut_graph=True)
    e_ref, g_ref = step_gradient(reference, reference.capture(), edits, reference_trace)
    e_tri, g_tri = step_gradient(fast, triton_capture, edits, reference_trace)
    torch.testing.assert_close(e_tri, e_ref, rtol=1e-5, atol=1e-7)
    assert ((g_tri - g_ref).norm() / g_ref.norm()).item() < 1e-4
