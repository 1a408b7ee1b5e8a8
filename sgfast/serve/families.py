"""What the server reads of a pipeline's model, whichever family it is: the denoiser (a UNet, or an
MMDiT transformer for SD3 / FLUX), its native size, the pixel multiple a size must be, and a seed's
initial noise as diffusers draws it (FLUX's packed into 2x2 tokens)."""

import torch


def denoiser(pipe):
    """The network every denoising step calls: `pipe.unet`, else `pipe.transformer`."""
    unet = getattr(pipe, "unet", None)
    return unet if unet is not None else pipe.transformer


def is_transformer(pipe):
    return getattr(pipe, "unet", None) is None


def native_size(pipe):
    """Pixels per side the model was built for (its pipeline's default size)."""
    if not is_transformer(pipe):
        return pipe.unet.config.sample_size * pipe.vae_scale_factor
    return pipe.default_sample_size * pipe.vae_scale_factor


def size_multiple(pipe):
    """Pixel sizes must divide down through the VAE and every UNet downsampling, or into the
    transformer's patches (FLUX: latents packed 2x2)."""
    if not is_transformer(pipe):
        return pipe.vae_scale_factor * 2 ** (len(pipe.unet.config.block_out_channels) - 1)
    return pipe.vae_scale_factor * getattr(pipe.transformer.config, "patch_size", 1) * (2 if packs_latents(pipe) else 1)


def packs_latents(pipe):
    return hasattr(pipe, "_pack_latents")


def initial_noise(pipe, seed, height, width):
    """[1, ...] noise of `seed` from a CPU generator, in the shape the pipeline's latents have."""
    model = denoiser(pipe)
    generator = torch.Generator().manual_seed(int(seed))
    if packs_latents(pipe):  # FLUX: 2x2 patches of the VAE latents as tokens
        channels = model.config.in_channels // 4
        h, w = 2 * (height // (pipe.vae_scale_factor * 2)), 2 * (width // (pipe.vae_scale_factor * 2))
        noise = torch.randn((1, channels, h, w), generator=generator, dtype=model.dtype)
        return pipe._pack_latents(noise, 1, channels, h, w)
    shape = (1, model.config.in_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    return torch.randn(shape, generator=generator, dtype=model.dtype)
