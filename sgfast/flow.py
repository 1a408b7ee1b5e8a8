"""Self-guidance under flow matching (FlowMatchEulerDiscreteScheduler: SD3 / SD3.5, FLUX.1).

The latents are x_s = (1 - s) x0 + s eps and the model predicts the velocity v = eps - x0; the
scheduler's step is x + (s_next - s) v. Classifier-style guidance in eps units is

    eps_hat = eps + w * s * grad_x E(x_s)

(the score of x_s given x0 is -eps / s, so s times an energy gradient is an eps-sized correction;
`w` is self_guidance_scale). At a fixed x_s, x0 = (x_s - s eps) / (1 - s), so

    v = eps - x0 = (eps - x_s) / (1 - s),   and   dv = d eps / (1 - s) = w * s * grad_x E / (1 - s).

That is the term added to the velocity. It moves the predicted clean image by
dx0 = -s dv = -w s^2 / (1 - s) grad_x E, which is what the same w does on a variance-preserving
model (DDIM, eps-prediction) at the same noise level: with n = sqrt((1 - s)^2 + s^2), the VP
latents are z = x_s / n, sqrt(alpha_bar) = (1 - s) / n, sqrt(1 - alpha_bar) = s / n and
grad_z = n grad_x, and DDIM's dx0 = -(1 - alpha_bar) / sqrt(alpha_bar) w grad_z E
= -w s^2 / (1 - s) grad_x E. A unit-RMS (`normalized`) gradient has lost its parameterisation's
scale; it is scaled by the VP noise level sqrt(1 - alpha_bar) = s / n, as on the other schedulers.

At s = 1 (the first step of every flow-matching schedule) x0 is not determined by x_s and the term
is unbounded: that step is not guided, as the zero-SNR step of a VP schedule is not.
"""

import math

from sgfast.sampler import ZERO_SNR_ALPHA_BAR


def is_flow_matching(scheduler):
    return type(scheduler).__name__.startswith("FlowMatch")


def flow_sigma(scheduler, timestep):
    """The s of the latents the scheduler holds at this step (its own step index, set as its step would)."""
    if scheduler.step_index is None:
        scheduler._init_step_index(timestep)
    return float(scheduler.sigmas[scheduler.step_index])


def flow_alpha_bar(sigma):
    """alpha_bar of the variance-preserving latents at the same noise level as x_s."""
    return (1 - sigma) ** 2 / ((1 - sigma) ** 2 + sigma**2)


def can_guide_flow(sigma):
    return flow_alpha_bar(sigma) > ZERO_SNR_ALPHA_BAR * (1 + 1e-3)


def flow_guidance_term(sigma, grad, weight, normalized=False):
    """w * s * grad / (1 - s): the self-guidance term in velocity units (see the module's docstring)."""
    scale = sigma / math.sqrt((1 - sigma) ** 2 + sigma**2) if normalized else sigma
    return grad * (weight * scale / (1 - sigma))


def renoise_flow(latents, ended, sigma, noise):
    """x at flow level `ended` taken back to the noisier level `sigma` with fresh `noise`
    (sgfast.repeats): x_s = (1 - s) x0 + s eps, so x_t = a x_s + sqrt(t^2 - (a s)^2) eps' with
    a = (1 - t) / (1 - s)."""
    scale = (1 - sigma) / (1 - ended)
    return scale * latents + math.sqrt(max(sigma * sigma - (scale * ended) ** 2, 0.0)) * noise
