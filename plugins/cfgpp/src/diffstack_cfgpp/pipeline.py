"""CFG++ on a diffusers Stable Diffusion pipeline's own modules, for the quality harness.

The pipeline's loop hands its scheduler only the guided noise, so this drives the UNet itself: one
batched call per step gives both halves (the :data:`GuidedDenoiser` contract) and
:func:`~diffstack_cfgpp.updates.sample` does the rest. The prompt encoder, noise, VAE and sigmas are
the pipeline's (its Euler scheduler's sigmas), so a picture differs from ordinary CFG only by the update.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from diffusers import EulerDiscreteScheduler
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from diffstack_cfgpp.updates import GuidedDenoiser, sample


def unet_denoiser(
    pipe: Any, sigmas: torch.Tensor, timesteps: torch.Tensor, uncond: torch.Tensor, cond: torch.Tensor
) -> GuidedDenoiser:
    """``(x, σ) → (ε_u, ε_c)`` from the pipeline's UNet (σ must be one of ``sigmas``'s, not the final 0)."""
    timestep_of = {float(s): t for s, t in zip(sigmas[:-1].tolist(), timesteps, strict=True)}
    embeddings = torch.cat([uncond, cond])

    def denoise(x: torch.Tensor, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
        model_input = torch.cat([x, x]) / (sigma**2 + 1) ** 0.5  # the ε-model sees the VP-scaled sample
        eps = pipe.unet(model_input, timestep_of[sigma], encoder_hidden_states=embeddings).sample
        eps_uncond, eps_cond = eps.chunk(2)
        return eps_uncond, eps_cond

    return denoise


@torch.no_grad()
def generate(
    pipe: Any, prompts: Sequence[str], seeds: Sequence[int], steps: int, scale: float, sampler: str
) -> list[Image.Image]:
    """One image per (prompt, seed), with one CPU generator per image as the engine seeds them."""
    scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    cond, uncond = pipe.encode_prompt(list(prompts), pipe.device, 1, True)
    size = pipe.unet.config.sample_size
    shape = (len(prompts), pipe.unet.config.in_channels, size, size)
    generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    noise = randn_tensor(shape, generator=generators, device=pipe.device, dtype=cond.dtype)
    sigmas = scheduler.sigmas
    denoiser = unet_denoiser(pipe, sigmas, scheduler.timesteps, uncond, cond)
    # the pipeline's own start (√(σ_max² + 1) for 'leading' spacing, σ_max otherwise), as the engine has
    latents = sample(denoiser, noise * scheduler.init_noise_sigma, sigmas.tolist(), scale, sampler)
    decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    images: list[Image.Image] = pipe.image_processor.postprocess(decoded, output_type="pil")
    return images
