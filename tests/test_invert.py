"""Photo editing: DDIM inversion (sgfast.invert) against diffusers' own DDIM step, the built-in model's
reconstruction of a scene it never generated (the fast slice of `python -m benchmarks.photo_edit`),
and clear errors for what it cannot take."""

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler

from benchmarks.photo_edit import check_reconstruction, measure, photos
from sgfast.invert import alpha_pairs, edit_arguments, inverse_step


@pytest.fixture(scope="module")
def sg(default_sg):
    return default_sg


@pytest.fixture(scope="module")
def photo():
    seed, scene, word_object = photos(1)[0]
    return scene, word_object


def test_inverse_step_undoes_diffusers_ddim_step():
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1, set_alpha_to_one=False, clip_sample=False)
    scheduler.set_timesteps(10)
    generator = torch.Generator().manual_seed(0)
    for t, alpha_t, alpha_prev in alpha_pairs(scheduler):
        z_prev = torch.randn(1, 4, 8, 8, generator=generator, dtype=torch.float64)
        eps = torch.randn(1, 4, 8, 8, generator=generator, dtype=torch.float64)
        z_t = inverse_step(z_prev, eps, alpha_t, alpha_prev)
        stepped = scheduler.step(eps, t, z_t, return_dict=False)[0]
        torch.testing.assert_close(stepped, z_prev, rtol=1e-5, atol=1e-6)  # alphas_cumprod is float32


def test_photo_reconstruction(sg, photo):
    """Negative-prompt inversion regenerates the photo to the VAE's own PSNR (within 1 dB) and the scene
    reader finds the same objects in the same places; plain inversion under CFG drifts further."""
    scene, _ = photo
    image = PIL.Image.fromarray(scene.image)
    inverted = sg.invert(image, scene.caption, num_inference_steps=10)
    info = inverted.inversion
    print(f"PSNR {info['psnr']:.1f} dB, VAE alone {info['vae_psnr']:.1f} dB")
    assert info["psnr"] > info["vae_psnr"] - 1.0
    assert check_reconstruction(scene, info["reconstruction"])
    plain = sg.invert(image, scene.caption, num_inference_steps=10, method="plain").inversion
    print(f"plain DDIM inversion under CFG: PSNR {plain['psnr']:.1f} dB")
    assert plain["psnr"] < info["psnr"]
    # The trace is the regeneration's: an unedited call with it gives the reconstruction again.
    again = sg(scene.caption, trace=inverted, **edit_arguments(inverted)).images[0]
    assert np.array_equal(np.asarray(again), np.asarray(info["reconstruction"]))


def test_photo_move_hits_its_target(sg):
    """The fast slice of the photo-editing benchmark (`python -m benchmarks.photo_edit`): a bare move
    of an inverted photo with the model's photo settings lands within 0.05 of its target while the
    other objects stay within 0.03 and keep their colours. Scene 5 of the benchmark (seed 3000004): with
    the settings tuned for generated images (strength 1, move weight 4) its green square jumped 0.42
    when the yellow circle moved; scene 1's move misses by 0.1 (RESULTS.md has the rate)."""
    seed, scene, word_object = photos(5)[4]
    row, _ = measure(sg, seed, scene, word_object, 25, kinds=("move",))
    print(row)
    assert row["reconstruction_ok"] and row["move_ok"], row


@pytest.mark.slow
def test_photo_move_and_resize(sg, photo):
    """One row of the photo-editing benchmark, scene 1: the photo comes back and both resizes land
    within 25% of the asked area ratio (its move is one of the benchmark's misses: 0.1 from the target)."""
    scene, word_object = photo
    row, _ = measure(sg, 0, scene, word_object, 25)
    print(row)
    assert row["reconstruction_ok"] and row["resize_2_ok"] and row["resize_0.5_ok"], row


def test_strength_leaves_the_first_steps_unguided(sg, photo):
    scene, _ = photo
    from sgfast.trace import Trace

    inverted = Trace(scene.caption, [], inversion=dict(arguments=dict(num_inference_steps=10, guidance_scale=5.0)))
    schedule = edit_arguments(inverted, 0.5, [True] * 10)["guidance_schedule"]
    assert schedule == [False] * 5 + [True] * 5
    assert edit_arguments(inverted, 1.0, [True] * 10)["guidance_schedule"] == [True] * 10
    for bad in (0, 1.5, "half"):
        with pytest.raises(ValueError, match="strength must be a number in"):
            edit_arguments(inverted, bad)
    with pytest.raises(ValueError, match="trace from sg.invert"):
        edit_arguments(Trace(scene.caption, []))


def test_invert_refuses_what_it_cannot_take(sg, photo):
    scene, _ = photo
    image = PIL.Image.fromarray(scene.image)
    with pytest.raises(ValueError, match="RGB image"):
        sg.invert(image.convert("CMYK"), scene.caption)
    with pytest.raises(ValueError, match="multiples of 8"):
        sg.invert(image.resize((1, 1)), scene.caption)
    with pytest.raises(ValueError, match="multiples of 8"):
        sg.invert(image.resize((60, 64)), scene.caption)
    with pytest.raises(ValueError, match="non-empty string"):
        sg.invert(image, "")
    with pytest.raises(ValueError, match="method must be one of"):
        sg.invert(image, scene.caption, method="null_text")
    with pytest.raises(ValueError, match="num_inference_steps"):
        sg.invert(image, scene.caption, num_inference_steps=1)
    scheduler = sg.pipe.scheduler
    sg.pipe.scheduler = EulerDiscreteScheduler.from_config(scheduler.config)
    try:
        with pytest.raises(ValueError, match="needs a DDIMScheduler"):
            sg.invert(image, scene.caption)
    finally:
        sg.pipe.scheduler = scheduler


def test_cli_edit_refuses_bad_flags(tmp_path):
    from sgfast.__main__ import main

    with pytest.raises(SystemExit, match="--move takes WORD:DX,DY"):
        main(["edit", str(tmp_path / "x.png"), "--prompt", "a red circle", "--move", "circle:0.2"])
    with pytest.raises(SystemExit, match="at least one --move"):
        main(["edit", str(tmp_path / "x.png"), "--prompt", "a red circle"])
    (tmp_path / "x.png").write_text("not an image")
    with pytest.raises(SystemExit, match="cannot read the photo"):
        main(["edit", str(tmp_path / "x.png"), "--prompt", "a red circle", "--move", "circle:0.2,0"])


def test_load_photo_checks_uploads(photo):
    import io

    from sgfast.invert import load_photo

    scene, _ = photo

    def png(image, **kwargs):
        buffer = io.BytesIO()
        image.save(buffer, format=kwargs.pop("format", "PNG"), **kwargs)
        return buffer.getvalue()

    image = PIL.Image.fromarray(scene.image)
    assert np.array_equal(np.asarray(load_photo(png(image))), scene.image)
    cases = {
        "not a readable image": b"hello, not an image",
        "sides must be multiples of 8": png(image.resize((1, 1))),
        "between 8 and 2048": png(PIL.Image.new("RGB", (4096, 64))),
        "'CMYK'": png(image.convert("CMYK"), format="JPEG"),
        "'I;16'": png(PIL.Image.fromarray(np.zeros((64, 64), np.uint16))),
        "PNG and JPEG are allowed": png(image, format="BMP"),
        "at most 100 are": png(image),
    }
    for message, data in cases.items():
        with pytest.raises(ValueError, match=message):
            load_photo(data, max_bytes=100 if message.startswith("at most") else 20 * 2**20)
