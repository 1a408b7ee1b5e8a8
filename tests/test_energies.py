"""The batched energies (sgfast.energies) against the per-layer reference formulation (Edit.energy on
Views), in float64 on random maps and features of odd sizes: values and gradients, every edit kind,
several items with different edits, a source traced at another resolution."""

import pytest
import torch

from sgfast import edits as E
from sgfast.energies import EnergyPlan, Layout, grid_at, layer_depth
from sgfast.trace import PromptWords, Trace, View

LAYERS = ["up_blocks.1.attentions.0.transformer_blocks.0.attn2", "up_blocks.1.attentions.1.transformer_blocks.0.attn2",
          "up_blocks.2.attentions.0.transformer_blocks.0.attn2"]
GRIDS = [(3, 5), (3, 5), (5, 9)]  # odd, non-square, two resolutions
SOURCE_GRIDS = [(4, 4), (4, 4), (7, 7)]  # a source traced at another resolution
CHANNELS, FEATURE_GRID = 7, (5, 9)
TIMESTEPS = [901, 801, 701]


def prompt_words(prompt):
    words = prompt.split()
    return PromptWords(prompt, words, [[i + 1] for i in range(len(words))])


def random_maps(generator, slots, grids, batch=None):
    lead = () if batch is None else (batch,)
    # Positive, peaked maps (a softmax over random logits), as attention probabilities are.
    return {name: torch.randn(*lead, slots, h * w, generator=generator, dtype=torch.float64).mul(2).softmax(-1).reshape(*lead, slots, h, w)
            for name, (h, w) in zip(LAYERS, grids)}


def random_trace(generator, prompt, grids):
    words = list(dict.fromkeys(prompt.split()))
    trace = Trace(prompt, words)
    for t in TIMESTEPS:
        appearance = torch.randn(len(words), CHANNELS, generator=generator, dtype=torch.float64)
        trace.add(t, random_maps(generator, len(words), grids), appearance)
    return trace


def edits_for(source, other):
    return [
        [E.move("circle", dx=0.25), E.keep_shape(), E.keep_shape(words=["square"], weight=3.0)],
        [E.move("circle", dx=-0.1, dy=0.2, keep_others=False, keep_own_shape_weight=2.0, keep_own_appearance_weight=1.5,
                keep_own_size_weight=1.2, shape_centroid_weight=2.5)],
        [E.place("square", x=0.3, y=0.7, keep_own_shape_weight=3.0, keep_centroid_weight=1.0, shape_centroid_weight=1.5)],
        [E.resize("square", scale=1.7, keep_centroid_weight=2.0, keep_size_weight=1.0, keep_own_centroid_weight=3.0,
                  keep_own_shape_weight=2.2, keep_own_shape_centroid_weight=1.9), E.keep_appearance(words=["red"])],
        [E.copy_appearance("circle", source, keep_appearance_weight=2.0, keep_shape_weight=1.0),
         E.copy_shape("square", source, translate=(0.1, -0.2), scale=1.3, rotate=20.0)],
        [E.copy_layout(other), E.collage([(source, ["circle"]), (other, ["square"])]), E.restyle(source, ["blue"])],
    ]


def reference_energy(items, maps, features, step):
    """Sum over items and edits of Edit.energy on Views (the reference formulation)."""
    total = 0.0
    for b, (item_edits, words, reference, pw) in enumerate(items):
        view = View(words, {name: m[b] for name, m in maps.items()}, features[b])
        ref = reference.view(TIMESTEPS[step], call=step)
        for edit in item_edits:
            total = total + edit.energy(view.subset(edit.needed_words(pw)), ref, TIMESTEPS[step])
    return total


@pytest.mark.parametrize("step", [0, 2])
def test_batched_energies_equal_the_per_layer_formulation(step):
    g = torch.Generator().manual_seed(step)
    prompts = ["a red circle and a blue square"] * 6
    source = random_trace(g, "a green circle and a blue square", SOURCE_GRIDS)
    other = random_trace(g, "a blue square and a red circle", GRIDS)
    items = []
    for prompt, item_edits in zip(prompts, edits_for(source, other)):
        pw = prompt_words(prompt)
        words = list(dict.fromkeys(w for e in item_edits for w in e.needed_words(pw)))
        items.append((item_edits, words, random_trace(g, prompt, GRIDS), pw))
    slots = max(len(w) for _, w, _, _ in items)
    maps = {name: m.requires_grad_(True) for name, m in random_maps(g, slots, GRIDS, batch=len(items)).items()}
    features = torch.randn(len(items), CHANNELS, *FEATURE_GRID, generator=g, dtype=torch.float64, requires_grad=True)

    expected = reference_energy(items, maps, features, step)
    layout = Layout(GRIDS)
    plan = EnergyPlan(items, layout, TIMESTEPS, list(range(len(TIMESTEPS))), LAYERS, FEATURE_GRID, dtype=torch.float64)
    stacked = torch.stack([layout.pad(m.flatten(-2)) for m in maps.values()])
    got = plan.energy(stacked, features, plan.target_table[step])
    assert set(plan.kinds) == {"centroid", "shape_centroid", "size", "shape", "appearance"} and plan.planes["shape"] >= 2
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    inputs = list(maps.values()) + [features]
    grads = torch.autograd.grad(got, inputs)
    expected_grads = torch.autograd.grad(expected, inputs)
    for a, b in zip(grads, expected_grads):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)


def test_layer_grids_follow_the_unets_downsampling():
    from sgfast.capture import grid_size
    from sgfast.testing import tiny_sdxl_pipeline

    unet = tiny_sdxl_pipeline().unet
    names = [n for n, m in unet.named_modules() if n.endswith("attn2")]
    for latent in ((16, 16), (9, 13)):
        seen = {}

        def hook(name):
            def record(module, args, kwargs, output):
                seen[name] = grid_size(args[0].shape[1], *latent)
            return record

        handles = [unet.get_submodule(n).register_forward_hook(hook(n), with_kwargs=True) for n in names]
        try:
            with torch.no_grad():
                context = torch.zeros(1, 77, unet.config.cross_attention_dim)
                added = dict(text_embeds=torch.zeros(1, 16), time_ids=torch.zeros(1, 6))
                unet(torch.zeros(1, 4, *latent), 10, context, added_cond_kwargs=added)
        finally:
            for h in handles:
                h.remove()
        assert seen == {n: grid_at(latent, layer_depth(unet, n)) for n in names}


def test_a_float64_pipeline_runs_its_energies_in_float64():
    from sgfast import SelfGuidancePipeline
    from sgfast.testing import tiny_pipeline

    sg = SelfGuidancePipeline.from_pipe(tiny_pipeline().to(torch.float64), mode="fast")
    out = sg("a red circle and a blue square", edits=[E.move("circle", dx=0.25, keep_others=False)],
             num_inference_steps=2, guidance_schedule=[True, True], generator=torch.Generator().manual_seed(0),
             output_type="latent")
    assert out.images.dtype == torch.float64 and len(out.energies) == 2
    # Step 0 starts where the reference is: the centroid is 0.25 (a float32 0.25) from its target, in x.
    assert out.energies[0][1] == pytest.approx(4.0 * (0.25 - 0.5 * 0.02), rel=1e-12)


@pytest.mark.parametrize("kind", [E.Move, E.Place, E.Resize, E.KeepShape, E.KeepAppearance, E.CopyAppearance,
                                  E.CopyShape, E.CopyLayout, E.Collage, E.Restyle])
def test_every_built_in_edit_runs_through_the_batched_energies(kind):
    """A built-in edit whose energy the batched plan describes (its terms), so that fast mode and CUDA
    graphs take it; only a user's own energy() goes through the per-layer path."""
    from sgfast.guided import has_terms

    assert has_terms(kind.__new__(kind))

    class OwnEnergy(kind):
        def energy(self, current, reference, timestep):
            return 0.0

    assert not has_terms(OwnEnergy.__new__(OwnEnergy))
