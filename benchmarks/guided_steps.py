"""One guided CFG step, two ways, with the same capture the sampler uses:

- `split_step`: as `sgfast.sampler.denoise` runs it today: the unconditional UNet pass at batch 1
  without gradients, then the conditional pass at batch 1 with the edits' words captured, and the
  energy's gradient with respect to the latents;
- `batched_step`: one batch-2 CFG forward ([uncond; cond], as a plain diffusers step) with the words
  captured from the conditional half only and the gradient taken to the conditional half's latents
  (the unconditional half enters detached).

Both return (guided noise prediction, latent gradient); on one model they agree up to rounding.
Which is faster depends on the GPU and the shape: one batch-2 pass fills a big GPU better than two
batch-1 passes, at the price of a batch-2 backward through the captured layers.
"""

import torch

from sgfast.sampler import FP16_LOSS_SCALE, edit_selection, energy_of, guidance_term, guided_energy
from sgfast.trace import PromptWords


class GuidedStep:
    """The inputs of one guided step of `prompt` with `edits` at step `step` of `steps`: the
    reference trace's starting noise as latents, [uncond; cond] embeddings, the timestep."""

    def __init__(self, sg, prompt, edits, reference, steps, step=1, guidance_scale=7.5):
        pipe = sg.pipe
        pipe.unet.requires_grad_(False)  # as fast mode: gradients to the latents only
        device = pipe._execution_device
        self.sg, self.edits, self.reference, self.step = sg, list(edits), reference, step
        self.guidance_scale = guidance_scale
        self.words = [PromptWords.from_tokenizer(pipe.tokenizer, prompt)]
        self.chosen, self.tokens = edit_selection([self.edits], self.words, device)
        self.features = any(e.needs_features for e in self.edits)
        self.cond, self.uncond = pipe.encode_prompt(prompt, device, 1, True)
        self.embeds = torch.cat([self.uncond, self.cond])
        pipe.scheduler.set_timesteps(steps, device=device)
        self.timestep = pipe.scheduler.timesteps[step]
        self.latents = (reference.latents * pipe.scheduler.init_noise_sigma).to(device, self.cond.dtype)


def _unet(pipe, latents, timestep, embeds):
    return pipe.unet(latents, timestep, encoder_hidden_states=embeds, return_dict=False)[0]


def _latent_gradient(energy, z):
    # fp16 latents: scale the energy so that small gradients do not underflow (as the sampler does).
    loss_scale = FP16_LOSS_SCALE if z.dtype == torch.float16 else 1.0
    (grad,) = torch.autograd.grad(energy * loss_scale, z)
    return grad.float() / loss_scale


def _combine(s, uncond, cond, grad):
    noise = uncond + s.guidance_scale * (cond - uncond)
    term = guidance_term(s.sg.pipe.scheduler, s.step, s.timestep, grad, 1.0)
    return noise + term.to(noise.dtype), grad


def split_step(s):
    """Uncond at batch 1 without gradients + cond at batch 1 with gradients (today's sampler)."""
    pipe, t = s.sg.pipe, s.timestep
    latent_in = pipe.scheduler.scale_model_input(s.latents, t)
    with s.sg.capture() as capture:
        with torch.no_grad():
            uncond = _unet(pipe, latent_in, t, s.uncond)
        z = s.latents.detach().requires_grad_(True)
        with torch.enable_grad():
            cond, energy = guided_energy(
                pipe, capture, z, t, s.cond, [(s.edits, s.reference)], s.words, s.chosen, s.tokens
            )
            grad = _latent_gradient(energy, z)
    return _combine(s, uncond, cond.detach(), grad)


def batched_step(s):
    """One batch-2 CFG forward; maps from the cond half, gradient to the cond half's latents only."""
    pipe, t = s.sg.pipe, s.timestep
    batch = s.latents.shape[0]
    z = s.latents.detach().requires_grad_(True)
    with s.sg.capture() as capture, torch.enable_grad():
        latent_in = pipe.scheduler.scale_model_input(torch.cat([s.latents.detach(), z]), t)
        with capture.record(*s.tokens, tuple(z.shape[-2:]), batch_slice=slice(batch, 2 * batch), features=s.features):
            noise = _unet(pipe, latent_in, t, s.embeds)
        # Outside the recording: the fast path switched gradients off after the last captured layer.
        energy = energy_of([s.edits], capture, s.words, s.chosen, [s.reference], t)
        grad = _latent_gradient(energy, z)
    uncond, cond = noise.detach().chunk(2)
    return _combine(s, uncond, cond, grad)
