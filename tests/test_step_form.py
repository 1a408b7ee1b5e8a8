"""guided_step="auto" (sgfast.step_form): the faster form chosen once per key by an injected timer,
kept in memory and in the cache file, the same image as the chosen form run directly, and clear
behaviour when the cache file is corrupt or cannot be written."""

import json
import warnings

import pytest
import torch

from sgfast import SelfGuidancePipeline, move, resize
from sgfast.graphs import StepGraphs
from sgfast.step_form import FIXED, StepFormChooser, cache_path, default_chooser
from sgfast.testing import tiny_pipeline

PROMPT = "a red circle and a blue square"
EDITS = [move("circle", dx=0.25, weight=8.0)]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


class Timer:
    """Says `faster` is faster; records what it was asked and runs each form once, as a timer would."""

    def __init__(self, faster, run_forms=True):
        self.faster, self.run_forms, self.calls = faster, run_forms, []

    def __call__(self, run, forms, device):
        self.calls.append((tuple(forms), torch.device(device).type))
        if self.run_forms:
            for form in forms:
                run(form)
        return {form: (1.0 if form == self.faster else 2.0) for form in forms}


def generate(sg, edits=EDITS, seed=0, **kwargs):
    kwargs = dict(num_inference_steps=3, generator=torch.Generator().manual_seed(seed), output_type="latent", **kwargs)
    return sg(PROMPT, edits=edits, **kwargs)


def measured(tmp_path, faster, **kwargs):
    return StepFormChooser(timer=Timer(faster, **kwargs), path=tmp_path / "guided_step.json", fixed={})


@pytest.mark.parametrize("faster", ["split", "batched"])
def test_auto_runs_the_faster_form_and_its_image_is_that_forms_bit_for_bit(pipe, tmp_path, faster):
    # eta = 1: DDIM draws step noise from the generator; the measurement must not move it.
    chooser = measured(tmp_path, faster)
    auto = SelfGuidancePipeline.from_pipe(pipe, mode="fast", guided_step="auto", step_forms=chooser)
    direct = SelfGuidancePipeline.from_pipe(pipe, mode="fast", guided_step=faster)
    rng = torch.get_rng_state()
    got, expected = generate(auto, eta=1.0), generate(direct, eta=1.0)
    assert torch.equal(torch.get_rng_state(), rng)
    assert got.guided_step == expected.guided_step == faster
    assert torch.equal(got.images, expected.images)
    assert got.energies == expected.energies
    choice = auto.guided_step_choice
    assert (choice.form, choice.source) == (faster, "measured") and choice.seconds[faster] == 1.0
    assert direct.guided_step_choice.source == "explicit"
    assert chooser.timer.calls == [(("split", "batched"), "cpu")]


def test_the_real_timer_measures_on_the_cpu_when_asked_and_the_image_is_the_chosen_forms(pipe, tmp_path):
    chooser = StepFormChooser(path=tmp_path / "guided_step.json", fixed={})  # wall_timer
    auto = SelfGuidancePipeline.from_pipe(pipe, mode="fast", step_forms=chooser)
    got = generate(auto)
    choice = auto.guided_step_choice
    assert choice.source == "measured" and set(choice.seconds) == {"split", "batched"}
    assert all(s > 0 for s in choice.seconds.values())
    assert choice.form == min(choice.seconds, key=choice.seconds.get)
    direct = SelfGuidancePipeline.from_pipe(pipe, mode="fast", guided_step=choice.form)
    assert torch.equal(got.images, generate(direct).images)


def test_the_choice_is_made_once_then_kept_in_memory_and_in_the_file(pipe, tmp_path):
    chooser = measured(tmp_path, "batched", run_forms=False)
    sg = SelfGuidancePipeline.from_pipe(pipe, mode="fast", step_forms=chooser)
    generate(sg)
    # Another call, other edits and seed, same key: no new measurement, even if the timer would now say otherwise.
    chooser.timer.faster = "split"
    again = generate(sg, edits=[resize("square", 1.5)], seed=3)
    assert again.guided_step == "batched" and sg.guided_step_choice.source == "memory"
    assert chooser.measurements == 1 and len(chooser.timer.calls) == 1
    # A new process (a new chooser on the same file) reads the choice back without measuring.
    saved = json.loads((tmp_path / "guided_step.json").read_text())
    (entry,) = saved["choices"].values()
    assert entry["form"] == "batched" and entry["seconds"] == {"split": 2.0, "batched": 1.0}
    assert entry["key"]["latents"] == [1, 4, 16, 16] and entry["key"]["device"] == "cpu"
    fresh = StepFormChooser(timer=Timer("split"), path=tmp_path / "guided_step.json", fixed={})
    other = SelfGuidancePipeline.from_pipe(pipe, mode="fast", step_forms=fresh)
    assert generate(other).guided_step == "batched"
    assert other.guided_step_choice.source == "file" and fresh.timer.calls == []
    # Another batch is another key: measured on its own.
    two = generate(sg, num_images_per_prompt=2)
    assert chooser.measurements == 2 and two.guided_step == "split"
    assert len(json.loads((tmp_path / "guided_step.json").read_text())["choices"]) == 2


@pytest.mark.parametrize("content", ["{not json", '{"version": 99, "choices": {}}', "[1, 2]", '{"version": 1}'])
def test_a_corrupt_cache_file_is_ignored_with_a_warning_and_rewritten(pipe, tmp_path, content):
    path = tmp_path / "guided_step.json"
    path.write_text(content)
    chooser = StepFormChooser(timer=Timer("batched", run_forms=False), path=path, fixed={})
    sg = SelfGuidancePipeline.from_pipe(pipe, mode="fast", step_forms=chooser)
    with pytest.warns(RuntimeWarning, match="is not a valid cache file"):
        out = generate(sg)
    assert out.guided_step == "batched" and chooser.measurements == 1
    assert json.loads(path.read_text())["version"] == 1  # replaced by a valid file


def test_an_unwritable_cache_keeps_the_choice_for_the_process_with_a_warning(pipe, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    chooser = StepFormChooser(timer=Timer("batched", run_forms=False), path=blocker / "guided_step.json", fixed={})
    sg = SelfGuidancePipeline.from_pipe(pipe, mode="fast", step_forms=chooser)
    with pytest.warns(RuntimeWarning, match="cannot write the guided-step cache .* holds for this process only"):
        assert generate(sg).guided_step == "batched"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # from memory now: no file touched, no warning
        assert generate(sg).guided_step == "batched"
    assert chooser.measurements == 1


def test_the_cpu_has_a_fixed_choice_and_touches_no_file(pipe, tmp_path):
    chooser = StepFormChooser(timer=Timer("batched"), path=tmp_path / "guided_step.json")
    sg = SelfGuidancePipeline.from_pipe(pipe, mode="fast", step_forms=chooser)
    assert generate(sg).guided_step == FIXED["cpu"] == "split"
    assert sg.guided_step_choice.source == "fixed" and chooser.timer.calls == []
    assert not (tmp_path / "guided_step.json").exists()


def test_without_cfg_or_without_guidance_nothing_is_measured(pipe, tmp_path):
    chooser = measured(tmp_path, "batched")
    sg = SelfGuidancePipeline.from_pipe(pipe, mode="fast", step_forms=chooser)
    out = generate(sg, guidance_scale=1.0)  # one conditional pass: both forms are the same
    assert out.guided_step == "split" and sg.guided_step_choice.source == "no CFG"
    assert generate(sg, self_guidance_scale=0.0).guided_step is None  # no gradient step ran
    assert generate(sg, edits=None).guided_step is None
    assert chooser.timer.calls == []


def test_defaults_and_refusals(pipe):
    assert SelfGuidancePipeline.from_pipe(pipe, mode="fast").guided_step == "auto"
    assert SelfGuidancePipeline.from_pipe(pipe).guided_step == "split"  # reference mode: the plain definition
    for bad in ("twice", "Auto", 2):
        with pytest.raises(ValueError, match=r"guided_step must be one of 'split' .*, 'batched' .*, 'auto' .*; got"):
            SelfGuidancePipeline.from_pipe(pipe, mode="fast", guided_step=bad)


def test_cache_path_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("SGFAST_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_path() == tmp_path / "xdg" / "sgfast" / "guided_step.json"
    monkeypatch.setenv("SGFAST_CACHE_DIR", str(tmp_path / "mine"))
    assert cache_path() == tmp_path / "mine" / "guided_step.json"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.delenv("SGFAST_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_path() == tmp_path / "home" / ".cache" / "sgfast" / "guided_step.json"
    assert default_chooser() is default_chooser()


@pytest.mark.parametrize("faster", ["split", "batched"])
def test_auto_with_cuda_graph_buffers_keeps_the_chosen_forms_graphs_only(pipe, tmp_path, faster):
    # The graphs' static-buffer path (dry run on the CPU): both forms are captured to be timed, the
    # other form's entries are dropped, and the image is that of the chosen form's graphs.
    chooser = measured(tmp_path, faster)
    auto = SelfGuidancePipeline.from_pipe(pipe, mode="fast", step_forms=chooser)
    auto._graphs = StepGraphs.for_pipeline(pipe, "fast", dry_run=True)
    direct = SelfGuidancePipeline.from_pipe(pipe, mode="fast", guided_step=faster)
    direct._graphs = StepGraphs.for_pipeline(pipe, "fast", dry_run=True)
    got, expected = generate(auto), generate(direct)
    assert torch.equal(got.images, expected.images) and got.guided_step == faster
    assert {key[1] for key in auto._graphs.entries if key[0] == "guided"} == {faster}
    assert "cuda graph" in auto.guided_step_choice.key


def test_mmdit_pipelines_take_auto_as_split():
    from sgfast.testing import tiny_sd3_pipeline

    pipe = tiny_sd3_pipeline()
    for value in (None, "auto", "split"):
        assert SelfGuidancePipeline.from_pipe(pipe, guided_step=value).guided_step == "split"
    with pytest.raises(ValueError, match="guided_step='batched' is not available for Stable Diffusion 3"):
        SelfGuidancePipeline.from_pipe(pipe, guided_step="batched")
    with pytest.raises(ValueError, match="guided_step must be one of"):
        SelfGuidancePipeline.from_pipe(pipe, guided_step="bogus")
