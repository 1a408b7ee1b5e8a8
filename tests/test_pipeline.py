"""The drop-in pipeline: identical to diffusers without edits, correct guidance, clear errors."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMPipeline, DPMSolverMultistepScheduler, EulerDiscreteScheduler, UNet2DModel

from sgfast import SelfGuidancePipeline, copy_appearance, copy_layout, copy_shape, collage, keep_shape, move, place, resize, restyle
from sgfast import edits as edits_module, properties
from sgfast.pipeline import SelfGuidanceOutput
from sgfast.sampler import default_schedule, edit_selection, guidance_term, guided_energy, unit_rms
from sgfast.testing import tiny_pipeline
from sgfast.trace import PromptWords, View

PROMPT = "a red circle and a blue square"
STEPS = 6


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def sg(tiny_pipe):
    return SelfGuidancePipeline.from_pipe(tiny_pipe)


@pytest.fixture(scope="module")
def base(sg):
    return sg(PROMPT, num_inference_steps=STEPS, generator=seeded(), output_type="latent")


@pytest.mark.parametrize("scheduler", [DDIMScheduler, EulerDiscreteScheduler, DPMSolverMultistepScheduler])
@pytest.mark.parametrize("record_trace", [True, False])
def test_no_edits_is_identical_to_diffusers(scheduler, record_trace):
    pipe = tiny_pipeline()
    pipe.scheduler = scheduler.from_config(pipe.scheduler.config)
    expected = pipe(PROMPT, num_inference_steps=STEPS, generator=seeded(), output_type="np").images
    out = SelfGuidancePipeline.from_pipe(pipe)(
        PROMPT, num_inference_steps=STEPS, generator=seeded(), output_type="np", record_trace=record_trace
    )
    assert isinstance(out, SelfGuidanceOutput)
    np.testing.assert_array_equal(out.images, expected)
    assert (out.trace is not None) == record_trace
    if record_trace:
        assert len(out.trace.steps) == STEPS and set(out.trace.words) == {"a", "red", "circle", "and", "blue", "square"}


def test_default_schedule_is_the_papers():
    s = default_schedule(32)
    assert s[:6] == [True] * 6  # 3/16 of 32 steps, every step
    assert s[6:12] == [True, False] * 3  # then every other step
    assert s[-1] is False  # none in the last 1/32
    assert sum(default_schedule(50)) == 9 + 20


def test_default_schedule_rounds_its_fractions():
    # 64 steps: 3/16 of them is 12 dense steps; 65 steps: still 12, and ceil(65/32) = 3 unguided at the end.
    s = default_schedule(64)
    assert s[:12] == [True] * 12 and s[12:16] == [True, False, True, False] and s[-2:] == [False, False]
    s = default_schedule(65)
    assert s[:12] == [True] * 12 and s[12:14] == [True, False] and s[60] is True and s[-3:] == [False] * 3


def test_a_guidance_schedule_in_each_form_it_takes():
    """None: the default; a callable of the step; one bool per step; or step indices in [0, n)."""
    from sgfast.sampler import resolve_schedule

    assert resolve_schedule(None, 7) == default_schedule(7)
    assert resolve_schedule(lambda i: i % 3 == 0, 7) == [True, False, False, True, False, False, True]
    assert resolve_schedule(lambda i: i, 3) == [False, True, True]  # truth values of what it returns
    assert resolve_schedule([True, False, True], 3) == [True, False, True]
    assert resolve_schedule((False,) * 3, 3) == [False] * 3
    assert resolve_schedule([0, 4], 5) == [True, False, False, False, True]  # both ends of the range
    assert resolve_schedule([2, 0, 1], 3) == [True] * 3  # as many indices as steps: still indices
    assert resolve_schedule({3}, 5) == [False, False, False, True, False]
    assert resolve_schedule(range(1, 5, 2), 5) == [False, True, False, True, False]
    assert resolve_schedule([], 4) == [False] * 4
    message = "guidance_schedule must be bools for each of the 4 steps or step indices in [0, 4)"
    for bad in ([4], [-1], [0, 1.0], [True, False], [True] * 5, [0, True], ["1"]):
        with pytest.raises(ValueError) as raised:
            resolve_schedule(bad, 4)
        assert str(raised.value) == message, bad


@pytest.mark.parametrize("scheduler", [DDIMScheduler, EulerDiscreteScheduler])
def test_guidance_gradient_matches_finite_differences(scheduler):
    pipe = tiny_pipeline().to(torch.float64)
    pipe.scheduler = scheduler.from_config(pipe.scheduler.config)
    sg = SelfGuidancePipeline.from_pipe(pipe)
    reference = sg(PROMPT, num_inference_steps=4, generator=seeded(), output_type="latent", guidance_scale=1.0).trace
    # Appearance edits are left out: their silhouette is detached on purpose (the paper's choice), so
    # their guidance is not the full derivative of their energy.
    edits = [[move("circle", dx=0.2, keep_others=False), resize("square", 1.5, keep_appearance_weight=0, keep_centroid_weight=3.0), copy_shape("circle", reference, "square")]]
    words = [PromptWords.from_tokenizer(pipe.tokenizer, PROMPT)]
    chosen, tokens = edit_selection(edits, words, "cpu")
    embeds = pipe.encode_prompt(PROMPT, "cpu", 1, False)[0]
    pipe.scheduler.set_timesteps(4)
    step, t = 1, pipe.scheduler.timesteps[1]
    z = torch.randn(1, 4, 16, 16, generator=seeded(3), dtype=torch.float64) * float(pipe.scheduler.init_noise_sigma)

    def energy(latents):
        with sg.capture() as capture:
            return guided_energy(pipe, capture, latents, t, embeds, list(zip(edits, [reference])), words, chosen, tokens)[1]

    with torch.enable_grad():
        zz = z.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(energy(zz), zz)
    assert grad.abs().max() > 0
    for seed in range(2):
        direction = torch.randn(z.shape, generator=seeded(10 + seed), dtype=torch.float64)
        h = 1e-5
        numeric = (energy(z + h * direction) - energy(z - h * direction)) / (2 * h)
        analytic = (grad * direction).sum()
        assert numeric.item() == pytest.approx(analytic.item(), rel=1e-4, abs=1e-9)
    # The term added to eps is v * sigma_t * grad, sigma_t as the scheduler parameterises the latents.
    term = guidance_term(pipe.scheduler, step, t, grad, 2.0)
    if scheduler is DDIMScheduler:
        sigma = (1 - pipe.scheduler.alphas_cumprod[int(t)]).sqrt()
    else:
        sigma = pipe.scheduler.sigmas[step]
    torch.testing.assert_close(term, 2.0 * float(sigma) * grad)


@pytest.mark.parametrize("make_edit", ["move", "resize", "copy_appearance"])
def test_strong_guidance_lowers_the_energy(sg, base, make_edit):
    # Random weights give tiny gradients (see the design notes): a strong scale shows the direction.
    # Appearance features are larger than maps: a tenth of the scale keeps its steps from overshooting.
    edit, scale = {
        "move": (lambda: move("circle", dx=0.3, keep_others=False), 100.0),
        "resize": (lambda: resize("circle", 2.0, keep_others=False), 100.0),
        "copy_appearance": (lambda: copy_appearance("circle", base.trace, "square"), 10.0),
    }[make_edit]
    runs = {
        v: sg(PROMPT, edits=[edit()], num_inference_steps=10, generator=seeded(), output_type="latent", self_guidance_scale=v).energies
        for v in (0.0, scale)
    }
    assert [s for s, _ in runs[0.0]] == [s for s, _ in runs[scale]]
    assert runs[scale][-1][1] < runs[0.0][-1][1]


def test_smooth_l1_distance():
    # L1 away from the target, quadratic within L1_SMOOTHING of it: no gradient of random sign on target.
    current = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    target = current.detach() + torch.randn(7, 3, dtype=torch.float64) * 0.03
    target[0] = current[0].detach()
    distance = edits_module._l1(current, target)
    beta = edits_module.L1_SMOOTHING
    gap = (current - target).abs().detach()
    far = gap >= beta
    torch.testing.assert_close(distance[far], gap[far] - beta / 2)
    torch.testing.assert_close(distance[~far], gap[~far] ** 2 / (2 * beta))
    (grad,) = torch.autograd.grad(distance.sum(), current)
    assert far.any() and (~far).any()
    assert (grad[0] == 0).all()
    torch.testing.assert_close(grad[far], torch.sign(current - target).detach()[far])
    assert torch.autograd.gradcheck(lambda c: edits_module._l1(c, target), (current,))


def test_keep_centroid_holds_the_other_objects_positions():
    words = ["circle", "blue", "square"]
    reference = {layer: torch.rand(3, h, w, dtype=torch.float64) for layer, (h, w) in {"a": (5, 7), "b": (8, 8)}.items()}
    reference["b"][2, 3, 2] = 100.0  # the square's map at one layer: a peak, then moved three pixels right
    current = {layer: m.clone() for layer, m in reference.items()}
    current["b"][2] = current["b"][2].roll(3, dims=-1)
    settings = dict(dx=0.1, keep_shape_weight=0.0, keep_appearance_weight=0.0)
    energy = lambda edit: edit.energy(View(words, current), View(words, reference), 0)
    extra = energy(move("circle", keep_centroid_weight=3.0, **settings)) - energy(move("circle", **settings))
    shift = (properties.centroid(current["b"][2][None, None]) - properties.centroid(reference["b"][2][None, None]))[0, 0]
    # x only, at one layer of two: 3 x (|dx| - beta/2) / 2; "blue" and the circle itself add nothing
    assert shift[0] > edits_module.L1_SMOOTHING and shift[1].abs() < 1e-12
    shift = shift[0]
    torch.testing.assert_close(extra, 3.0 * (shift - edits_module.L1_SMOOTHING / 2) / 2)


def test_keep_size_holds_the_other_objects_areas_in_log_ratio():
    # The square's map widened at every layer: the size term adds keep_size_weight x |log ratio| of
    # its soft-silhouette size (smooth L1, mean over layers); the resized circle and "blue" do not
    # count (the circle's own size is the resize's term), and a size already on target adds nothing.
    words = ["circle", "blue", "square"]
    reference = {layer: torch.rand(3, h, w, dtype=torch.float64) * 0.1 for layer, (h, w) in {"a": (6, 6), "b": (8, 8)}.items()}
    for m in reference.values():
        m[2, 1:3, 1:3] += 1.0
    current = {layer: m.clone() for layer, m in reference.items()}
    for m in current.values():
        m[2, 1:5, 1:5] += 1.0
    settings = dict(keep_shape_weight=0.0, keep_appearance_weight=0.0)
    energy = lambda edit, now: edit.energy(View(words, now), View(words, reference), 0)
    extra = energy(resize("circle", 2.0, keep_size_weight=3.0, **settings), current) - energy(resize("circle", 2.0, **settings), current)
    sizes = lambda maps: torch.stack([properties.size(m[2][None, None])[0, 0] for m in maps.values()])
    gaps = (sizes(current).log() - sizes(reference).log()).abs()
    assert (gaps > edits_module.L1_SMOOTHING).all()
    torch.testing.assert_close(extra, 3.0 * (gaps - edits_module.L1_SMOOTHING / 2).mean())
    on_target = energy(resize("circle", 2.0, keep_size_weight=3.0, **settings), reference) - energy(resize("circle", 2.0, **settings), reference)
    assert on_target == 0
    with pytest.raises(ValueError, match="weight"):
        resize("circle", 2.0, keep_size_weight=-1.0)


def test_unit_rms_per_item():
    grad = torch.randn(3, 4, 5, 7, dtype=torch.float64) * torch.tensor([1e-6, 30.0, 0.0], dtype=torch.float64)[:, None, None, None]
    unit = unit_rms(grad)
    rms = unit.pow(2).mean(dim=(1, 2, 3)).sqrt()
    torch.testing.assert_close(rms[:2], torch.ones(2, dtype=torch.float64))
    assert (unit[2] == 0).all()
    torch.testing.assert_close(unit[:2] * grad[:2].pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt(), grad[:2])


def test_normalized_gradient_ignores_the_energy_scale(sg, base):
    # Normalised, the step depends on the gradient's direction only: weights 1 and 1000 agree, and
    # differ from the unguided image.
    run = lambda weight, v: sg(
        PROMPT, edits=[move("circle", dx=0.3, keep_others=False, weight=weight)], num_inference_steps=STEPS,
        trace=base.trace, output_type="latent", self_guidance_scale=v, normalize_gradient=True,
    ).images
    small, large = run(1.0, 0.5), run(1000.0, 0.5)
    torch.testing.assert_close(small, large, rtol=1e-4, atol=1e-5)
    assert (small - run(1.0, 0.0)).abs().max() > 1e-3


def test_trace_reuse_skips_the_reference_pass(sg, base, tiny_pipe):
    calls = []
    hook = tiny_pipe.unet.register_forward_hook(lambda *a: calls.append(1))
    try:
        sg(PROMPT, edits=[move("circle", dx=0.1)], num_inference_steps=STEPS, generator=seeded(), output_type="latent")
        fresh = len(calls)
        calls.clear()
        out = sg(PROMPT, edits=[move("circle", dx=0.1)], num_inference_steps=STEPS, trace=base.trace, output_type="latent")
        reused = len(calls)
    finally:
        hook.remove()
    assert fresh == reused + STEPS  # the unedited pass ran once, only when no trace was given
    assert out.trace is base.trace


@pytest.mark.parametrize("scheduler", [DDIMScheduler, EulerDiscreteScheduler])
def test_a_trace_reproduces_the_traced_noise(scheduler):
    pipe = tiny_pipeline()
    pipe.scheduler = scheduler.from_config(pipe.scheduler.config)
    sg = SelfGuidancePipeline.from_pipe(pipe)
    first = sg(PROMPT, num_inference_steps=STEPS, generator=seeded(), output_type="latent")
    again = sg(PROMPT, num_inference_steps=STEPS, trace=first.trace, output_type="latent")
    torch.testing.assert_close(again.images, first.images)


def test_batch_with_different_edits_per_prompt(sg):
    prompts = [PROMPT, "a green triangle"]
    out = sg(
        prompts,
        edits=[[move("circle", dx=0.2)], []],
        num_inference_steps=STEPS,
        generator=seeded(),
        output_type="latent",
    )
    assert out.images.shape[0] == 2 and isinstance(out.trace, list) and len(out.trace) == 2
    alone = sg(prompts[1], num_inference_steps=STEPS, latents=out.trace[1].latents, output_type="latent")
    # The second item had no edits: its gradient is zero, so it matches its own unedited run (to the
    # float rounding of a batch of 2 prompts against 1).
    torch.testing.assert_close(out.images[1:], alone.images, rtol=1e-4, atol=1e-4)


def test_every_edit_runs(sg, base):
    # Together in one call; what each edit does is checked in test_edit_targets.py (restyle needs a
    # style word in the prompt: test_restyle_through_a_style_word).
    other = sg("a blue square and a red circle painting", num_inference_steps=STEPS, generator=seeded(1), output_type="latent").trace
    edits = [
        place("circle", 0.2, 0.8),
        keep_shape(["square"]),
        copy_shape("circle", other, translate=(0.1, 0.0), scale=1.2, rotate=30),
        copy_layout(other),
        collage([(other, ["circle"]), (base.trace, ["square"])]),
        keep_shape(),
    ]
    out = sg(PROMPT, edits=edits, num_inference_steps=STEPS, generator=seeded(), trace=base.trace, output_type="np")
    assert out.images.shape == (1, 64, 64, 3) and np.isfinite(out.images).all()
    assert len(out.energies) == sum(default_schedule(STEPS))


def test_restyle_through_a_style_word(sg):
    styled = sg("a red circle painting", num_inference_steps=STEPS, generator=seeded(2), output_type="latent").trace
    out = sg("a red circle painting", edits=[restyle(styled, ["painting"])], num_inference_steps=STEPS, generator=seeded(), output_type="latent")
    assert torch.isfinite(out.images).all() and out.energies


def test_real_image_trace_as_a_source(sg):
    image = np.zeros((64, 64, 3), dtype=np.float32)
    image[16:40, 8:32] = [1.0, 0.0, 0.0]
    real = sg.trace_image(image, "a red square", num_inference_steps=STEPS, generator=seeded())
    assert real.latents is None and len(real.steps) == STEPS and "square" in real.words
    out = sg(PROMPT, edits=[copy_shape("square", real), copy_appearance("square", real)], num_inference_steps=STEPS, generator=seeded(), output_type="latent")
    assert torch.isfinite(out.images).all()


# ---- bad input: a clear error, and nothing changed --------------------------------------------


@pytest.mark.parametrize(
    "prompt, edit, held",
    [
        # the edited object's own words ("red" of "red circle") move with it; the other objects are held
        (PROMPT, move("circle", dx=0.1), ["blue", "square"]),
        (PROMPT, resize("red", 2.0), ["blue", "square"]),
        ("a green triangle and a red circle and a blue square", place("circle", 0.5, 0.5), ["green", "triangle", "blue", "square"]),
        (PROMPT, move("circle", dx=0.1, keep=["red", "square"]), ["red", "square"]),
        (PROMPT, move("circle", dx=0.1, keep_others=False), []),
    ],
)
def test_default_keep_set_leaves_out_the_edited_objects_words(tiny_pipe, prompt, edit, held):
    words = PromptWords.from_tokenizer(tiny_pipe.tokenizer, prompt)
    assert edit.needed_words(words) == [edit.word] + held


def processors(pipe):
    return dict(pipe.unet.attn_processors)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda sg: sg(PROMPT, edits=[move("zebra", dx=0.1)], num_inference_steps=2), r"'zebra' is not in the prompt.*\['a', 'red', 'circle'"),
        (lambda sg: sg(PROMPT, latents=torch.full((1, 4, 16, 16), float("nan")), num_inference_steps=2), "NaN"),
        (lambda sg: sg(PROMPT, edits=[move("circle")], guidance_schedule=[99], num_inference_steps=2), "guidance_schedule"),
    ],
)
def test_bad_calls_fail_clearly_and_change_nothing(sg, call, message):
    before = processors(sg.pipe)
    with pytest.raises(ValueError, match=message):
        call(sg)
    assert processors(sg.pipe) == before


@pytest.fixture(scope="module")
def traces(sg):
    """An unedited generation's trace of PROMPT and one of another prompt, at 2 steps."""
    return {p: sg(p, num_inference_steps=2, output_type="latent").trace for p in (PROMPT, "a blue square")}


REFUSED = {  # a call, and the whole message of the error it gets
    "count 0": (dict(num_images_per_prompt=0), "num_images_per_prompt must be an integer >= 1, got 0"),
    "count True": (dict(num_images_per_prompt=True), "num_images_per_prompt must be an integer >= 1, got True"),
    "count 1.5": (dict(num_images_per_prompt=1.5), "num_images_per_prompt must be an integer >= 1, got 1.5"),
    "v nan": (dict(edits=[move("circle")], self_guidance_scale=float("nan")),
              "self_guidance_scale must be a finite number, got nan"),
    "v str": (dict(edits=[move("circle")], self_guidance_scale="1"), "self_guidance_scale must be a finite number, got '1'"),
    "normalize": (dict(edits=[move("circle")], normalize_gradient="yes"),
                  "normalize_gradient must be True or False, got 'yes'"),
    "embeds rows": (dict(prompt=[PROMPT, PROMPT], prompt_embeds=torch.zeros(1, 77, 32)),
                    "got 2 prompts for 1 rows of prompt_embeds"),
    "edit lists": (dict(edits=[[move("circle")], []]), "got 2 lists of edits for 1 prompts"),
    "not an edit": (dict(edits=["move circle"]), "edits must be sgfast.edits objects (move, resize, ...); got 'move circle'"),
    "embeds with edits": (dict(prompt=None, prompt_embeds=torch.zeros(1, 77, 32), edits=[move("circle")]),
                          "edits name words of the prompt: pass `prompt` (its words) along with `prompt_embeds`"),
    "embeds with a trace": (dict(prompt=None, prompt_embeds=torch.zeros(1, 77, 32), trace=PROMPT),
                            "a trace is the unedited generation of a prompt: pass `prompt` (its words) along with "
                            "`prompt_embeds`"),
    "trace count": (dict(edits=[move("circle")], trace=[PROMPT, PROMPT]), "got 2 traces for 1 images"),
    "trace prompt": (dict(edits=[move("circle")], trace="a blue square"),
                     "the trace of 'a blue square' is not the unedited generation of 'a red circle and a blue square'; "
                     "use it as an edit's source instead"),
    "trace settings": (dict(edits=[move("circle")], trace=PROMPT, guidance_scale=3.0, eta=0.5),
                       "the trace was recorded with other settings than this call: guidance_scale: 7.5 there, 3.0 here; "
                       "eta: 0.0 there, 0.5 here. Leave them out (a call with a trace takes the trace's), or use it as an edit's "
                       "source instead"),
    "no guided step": (dict(edits=[move("circle")], num_inference_steps=1),
                       "the guidance schedule guides none of the 1 steps, so the edits would do nothing; use more steps "
                       "or a guidance_schedule that guides at least one"),
}


@pytest.mark.parametrize("name", REFUSED)
def test_each_refused_call_gets_its_whole_message_and_changes_nothing(sg, traces, name):
    kwargs, message = REFUSED[name]
    kwargs = {"prompt": PROMPT, "num_inference_steps": 2, "output_type": "latent", **kwargs}
    if "trace" in kwargs:  # traces named by their prompt
        trace = kwargs["trace"]
        kwargs["trace"] = [traces[t] for t in trace] if isinstance(trace, list) else traces[trace]
    before, state = processors(sg.pipe), torch.random.get_rng_state()
    with pytest.raises((ValueError, TypeError)) as raised:
        sg(**kwargs)
    assert type(raised.value) is (TypeError if name == "not an edit" else ValueError)
    assert str(raised.value) == message
    assert processors(sg.pipe) == before and torch.equal(torch.random.get_rng_state(), state)


@pytest.mark.parametrize("trace, named", [("a red circle", "a str"), ({"prompt": PROMPT}, "a dict"), (["a red circle"], "a list holding a str")])
def test_a_trace_that_is_not_one_is_refused(sg, trace, named):
    before = processors(sg.pipe)
    with pytest.raises(TypeError) as raised:
        sg(PROMPT, edits=[move("circle")], trace=trace, num_inference_steps=2, output_type="latent")
    assert str(raised.value) == f"trace must be a Trace (a call's .trace, or sg.invert's) or a list of them, got {named}"
    assert processors(sg.pipe) == before


def test_a_single_edit_is_a_list_of_one(sg, base):
    kwargs = dict(num_inference_steps=STEPS, trace=base.trace, output_type="latent")
    one = sg(PROMPT, edits=move("circle", dx=0.2), **kwargs)
    listed = sg(PROMPT, edits=[move("circle", dx=0.2)], **kwargs)
    assert torch.equal(one.images, listed.images) and not torch.equal(one.images, base.images)


def test_a_bad_mode_or_compile_without_fast_mode_is_refused(tiny_pipe):
    with pytest.raises(ValueError) as raised:
        SelfGuidancePipeline(tiny_pipe, mode="turbo")
    assert str(raised.value) == "mode must be one of ('reference', 'fast'), got 'turbo'"
    with pytest.raises(ValueError) as raised:
        SelfGuidancePipeline(tiny_pipe, compile=True)
    assert str(raised.value) == "compile=True needs mode='fast'"


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: place("circle", 1.5, 0.5), r"x must be in \[0.0, 1.0\]"),
        (lambda: place("circle", 0.5, -0.1), r"y must be in \[0.0, 1.0\]"),
        (lambda: move("circle", dx=2.0), r"dx must be in \[-1.0, 1.0\]"),
        (lambda: resize("circle", 0.0), "scale must be a finite number > 0"),
        (lambda: resize("circle", -1.0), "scale must be a finite number > 0"),
        (lambda: move("circle", dx=0.1, weight=float("nan")), "weight must be a finite number >= 0"),
    ],
)
def test_bad_edit_arguments(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_unknown_layer_and_unsupported_pipeline(tiny_pipe):
    before = processors(tiny_pipe)
    with pytest.raises(ValueError, match="unknown cross-attention layer 'mid_block.nope'"):
        SelfGuidancePipeline.from_pipe(tiny_pipe, layers=["mid_block.nope"])
    with pytest.raises(ValueError, match="unknown feature layer"):
        SelfGuidancePipeline.from_pipe(tiny_pipe, feature_layer="up_blocks.7")
    unconditional = DDPMPipeline(UNet2DModel(sample_size=8, block_out_channels=(8, 8), norm_num_groups=4, down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2), DDIMScheduler())
    with pytest.raises(TypeError) as raised:
        SelfGuidancePipeline.from_pipe(unconditional)
    assert str(raised.value) == ("SelfGuidancePipeline wraps diffusers' StableDiffusionPipeline (Stable Diffusion 1.x/2.x) or "
                                 "StableDiffusionXLPipeline (Stable Diffusion XL); got DDPMPipeline")
    assert processors(tiny_pipe) == before


def test_failure_during_sampling_restores_processors(sg):
    class Broken(type(move("circle"))):
        def object_energy(self, current, reference):
            raise RuntimeError("broken edit")

    before = processors(sg.pipe)
    hooks = dict(sg.pipe.unet.up_blocks[0]._forward_hooks)
    with pytest.raises(RuntimeError, match="broken edit"):
        sg(PROMPT, edits=[Broken("circle", dx=0.1)], num_inference_steps=3, generator=seeded())
    assert processors(sg.pipe) == before
    assert dict(sg.pipe.unet.up_blocks[0]._forward_hooks) == hooks


@pytest.mark.parametrize("per_prompt", [False, True], ids=["one generator", "one per prompt"])
def test_a_trace_replays_each_prompts_step_noise_as_diffusers_draws_it(per_prompt):
    """DDIM with eta=1 draws fresh noise at every step: the plain call and the call on its trace (no
    generator given) both end where diffusers ends with the same generators."""
    pipe = tiny_pipeline()
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    prompts = [PROMPT, "a green triangle"]

    def generators():
        return [seeded(0), seeded(1)] if per_prompt else seeded(0)

    expected = pipe(prompts, num_inference_steps=STEPS, eta=1.0, generator=generators(), output_type="latent").images
    sg = SelfGuidancePipeline.from_pipe(pipe)
    first = sg(prompts, num_inference_steps=STEPS, eta=1.0, generator=generators(), output_type="latent")
    torch.testing.assert_close(first.images, expected)
    again = sg(prompts, num_inference_steps=STEPS, eta=1.0, trace=first.trace, output_type="latent")
    torch.testing.assert_close(again.images, expected)


def test_without_a_generator_an_edit_draws_from_the_default_one(sg):
    """No generator: the latents and the step noise come from torch's default generator, and the edited
    pass draws the unedited pass's step noise again, as with a generator seeded the same."""
    scheduler = sg.pipe.scheduler
    sg.pipe.scheduler = DDIMScheduler.from_config(scheduler.config)
    call = dict(edits=[move("circle", dx=0.2)], num_inference_steps=STEPS, eta=1.0, output_type="latent")
    try:
        expected = sg(PROMPT, generator=seeded(3), **call)
        with torch.random.fork_rng():
            torch.manual_seed(3)
            out = sg(PROMPT, **call)
    finally:
        sg.pipe.scheduler = scheduler
    torch.testing.assert_close(out.images, expected.images)
    torch.testing.assert_close(out.trace.latents, expected.trace.latents)


def test_words_and_decode_are_the_tokenizers_and_diffusers(sg, tiny_pipe, base):
    assert sg.words("A red circle, and a blue catdog") == ["a", "red", "circle", ",", "and", "a", "blue", "catdog"]
    latents = base.images
    vae = tiny_pipe.vae
    with torch.no_grad():
        image = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
    expected = tiny_pipe.image_processor.postprocess(image, output_type="np", do_denormalize=[True])
    np.testing.assert_array_equal(sg.decode(latents, output_type="np"), expected)
    assert sg.decode(latents, output_type="latent") is latents
    from PIL import Image

    (pil,) = sg.decode(latents)  # diffusers' default output: PIL images
    assert isinstance(pil, Image.Image)
    np.testing.assert_array_equal(np.asarray(pil), tiny_pipe.image_processor.numpy_to_pil(expected)[0])


def test_invert_method_is_sgfast_invert(sg):
    from PIL import Image

    from sgfast.invert import invert

    scheduler = sg.pipe.scheduler
    sg.pipe.scheduler = DDIMScheduler.from_config(scheduler.config)
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    options = dict(num_inference_steps=3, guidance_scale=2.0, method="plain")
    try:
        got = sg.invert(photo, PROMPT, **options)
        want = invert(sg, photo, PROMPT, **options)
    finally:
        sg.pipe.scheduler = scheduler
    torch.testing.assert_close(got.latents, want.latents)
    assert got.inversion["arguments"] == want.inversion["arguments"]
    assert got.inversion["arguments"]["guidance_scale"] == 2.0 and got.inversion["arguments"]["num_inference_steps"] == 3


def test_fast_mode_freezes_the_unet_weights_and_reference_mode_leaves_them():
    """Fast mode needs gradients to the latents only; reference mode changes nothing of the pipeline."""
    pipe = tiny_pipeline()
    pipe.unet.requires_grad_(True)
    reference = SelfGuidancePipeline.from_pipe(pipe)
    assert reference.mode == "reference" and all(p.requires_grad for p in pipe.unet.parameters())
    fast = SelfGuidancePipeline.from_pipe(pipe, mode="fast")
    assert fast.mode == "fast" and not any(p.requires_grad for p in pipe.unet.parameters())


def test_compile_compiles_the_unet_forward_with_the_named_backend(monkeypatch):
    """compile=True: inductor; a string: that backend; only in fast mode, and then the capture never
    stops the UNet early (no exception out of a compiled graph). torch.compile itself is replaced
    here by a recorder: what it is given is the contract (tests/test_fast.py compiles for real)."""
    calls = []

    def fake_compile(fn, backend):
        calls.append((fn, backend))
        return "compiled"

    monkeypatch.setattr(torch, "compile", fake_compile)
    pipe = tiny_pipeline()
    with pytest.raises(ValueError, match=r"^compile=True needs mode='fast'$"):
        SelfGuidancePipeline.from_pipe(pipe, compile=True)
    assert calls == [] and pipe.unet.forward != "compiled"
    for compile, backend in ((True, "inductor"), ("aot_eager", "aot_eager")):
        pipe = tiny_pipeline()
        forward = pipe.unet.forward
        sg = SelfGuidancePipeline.from_pipe(pipe, mode="fast", compile=compile)
        assert calls.pop() == (forward, backend) and pipe.unet.forward == "compiled"
        assert sg.capture().can_stop_early is False
    assert SelfGuidancePipeline.from_pipe(tiny_pipeline(), mode="fast").capture().can_stop_early is True


def test_a_trace_records_the_image_size(sg, base):
    assert base.trace.image_size == (64, 64)  # the tiny UNet's sample size 16 x the VAE's factor 4
    out = sg(PROMPT, height=48, width=32, num_inference_steps=2, generator=seeded(), output_type="latent")
    assert out.trace.image_size == (48, 32) and out.images.shape[-2:] == (12, 8)


def test_fast_mode_asks_for_the_fused_op_where_there_is_one(monkeypatch):
    """Fast mode's maps come from attention_stats with impl="auto" (Triton on CUDA, the reference
    here); reference mode's from the plain PyTorch reference."""
    import sgfast.capture

    impls = []
    real = sgfast.capture.attention_stats
    monkeypatch.setattr(sgfast.capture, "attention_stats", lambda *a, impl, **kw: impls.append(impl) or real(*a, impl=impl, **kw))
    for mode, impl in (("reference", "torch"), ("fast", "auto")):
        impls.clear()
        sg = SelfGuidancePipeline.from_pipe(tiny_pipeline(), mode=mode)
        sg(PROMPT, edits=[move("circle", dx=0.2)], num_inference_steps=2, generator=seeded(), output_type="latent")
        assert impls and set(impls) == {impl}


@pytest.mark.parametrize("guidance_scale", [5.0, 1.0], ids=["cfg", "no-cfg"])
def test_a_trace_holds_each_prompts_conditional_maps_and_appearance_at_every_call(sg, guidance_scale):
    """Each prompt's trace is what a capture of that prompt's conditional row records at each UNet
    call of the generation (the rows after the unconditional half under CFG), for every word."""
    from sgfast.capture import Capture
    from sgfast.trace import selection

    prompts = [PROMPT, "a blue square"]
    unet = sg.pipe.unet
    calls = []
    hook = unet.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append((args[0].clone(), args[1], kwargs["encoder_hidden_states"].clone())),
        with_kwargs=True)
    try:
        out = sg(prompts, num_inference_steps=2, guidance_scale=guidance_scale, generator=torch.Generator().manual_seed(3),
                 output_type="latent")
    finally:
        hook.remove()
    assert len(calls) == 2 and all(len(t.calls) == 2 for t in out.trace)
    for b, (prompt, trace) in enumerate(zip(prompts, out.trace)):
        row = b + (len(prompts) if guidance_scale > 1 else 0)
        words = PromptWords.from_tokenizer(sg.pipe.tokenizer, prompt)
        for call, (latents, t, embeds) in enumerate(calls):
            with torch.no_grad(), Capture(unet, sg.layers, sg.feature_layer) as capture:
                with capture.record(*selection([words], [trace.words], "cpu"), tuple(latents.shape[-2:]),
                                    batch_slice=slice(row, row + 1)):
                    unet(latents, t, encoder_hidden_states=embeds)
                want = View(trace.words, {k: m[0] for k, m in capture.maps.items()}, capture.features[0])
                want_appearance = torch.stack([want.appearance(w) for w in trace.words])
            got = trace.view(t, call=call)
            assert trace.calls[call][0] == int(t)
            for layer in sg.layers:
                torch.testing.assert_close(got.maps[layer], want.maps[layer][: len(trace.words)], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(torch.stack([got.appearance(w) for w in trace.words]), want_appearance,
                                       rtol=1e-5, atol=1e-6)
