"""The CFG++ updates in the ε/σ parameterisation (``x = x0 + σ·ε``, k-diffusion's convention).

Ordinary classifier-free guidance extrapolates the noise, ``ε_g = ε_u + w(ε_c − ε_u)`` with w > 1,
and both denoises and re-noises with ``ε_g``; the re-noised sample leaves the data manifold at
large w. CFG++ (Chung et al., 2024) keeps the guided prediction only for the data estimate
``x0 = x − σ·ε_g`` with a scale λ in [0, 1], and re-noises with the *unconditional* noise ``ε_u``.
So every update needs both halves of the guidance step, not just their mix: that is why the step
functions take ``eps_uncond`` and ``eps_cond`` rather than one prediction.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from diffstack import SamplerStep

SAMPLERS = ("euler_cfgpp", "dpmpp_2m_cfgpp")
"""The sampler names this plugin implements."""

GuidedDenoiser = Callable[[torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]]
"""``(x, σ) → (ε_u, ε_c)``: one model call giving both noise predictions for a noisy sample."""


def guided_noise(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """``ε_u + λ(ε_c − ε_u)``; λ outside [0, 1] is refused (CFG++ interpolates, never extrapolates)."""
    if not 0.0 <= scale <= 1.0:
        raise ValueError(f"CFG++ guidance scale must be in [0, 1], got {scale}")
    return eps_uncond + scale * (eps_cond - eps_uncond)


def euler_cfgpp_step(
    x: torch.Tensor,
    sigma: float,
    sigma_next: float,
    eps_uncond: torch.Tensor,
    eps_cond: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One Euler CFG++ step: ``x0 = x − σ·ε_g``, then ``x_next = x0 + σ_next·ε_u``."""
    x0 = x - sigma * guided_noise(eps_uncond, eps_cond, scale)
    return x0 + sigma_next * eps_uncond


@dataclass(frozen=True)
class DPMpp2MState:
    """What the second-order DPM++ 2M step remembers from the step before."""

    sigma: float
    x0_uncond: torch.Tensor


def dpmpp_2m_cfgpp_step(
    x: torch.Tensor,
    sigma: float,
    sigma_next: float,
    eps_uncond: torch.Tensor,
    eps_cond: torch.Tensor,
    scale: float,
    previous: DPMpp2MState | None,
) -> tuple[torch.Tensor, DPMpp2MState]:
    """One DPM++ 2M CFG++ step; returns the next sample and the state for the step after.

    With ``t = −log σ``, ``h = t_next − t``, the guided data estimate ``x0_g`` and the unconditional
    one ``x0_u = x − σ·ε_u``::

        x_next = x0_g + e^{−h}(x − x0_u) − expm1(−h)/(2r)·(x0_g − x0_u_prev),   r = h_prev / h

    The first step (and the last, to σ = 0) drops the correction and is exactly Euler CFG++. The
    correction's difference pairs the guided estimate with the previous unconditional one, as the
    reference implementation (ComfyUI's ``sample_dpmpp_2m_cfg_pp``) does; with ε_u = ε_c it is plain
    DPM++ 2M.
    """
    x0_guided = x - sigma * guided_noise(eps_uncond, eps_cond, scale)
    x0_uncond = x - sigma * eps_uncond
    state = DPMpp2MState(sigma, x0_uncond)
    if sigma_next == 0:
        return x0_guided, state
    h = math.log(sigma / sigma_next)
    x_next = x0_guided + math.exp(-h) * (x - x0_uncond)
    if previous is not None:
        r = math.log(previous.sigma / sigma) / h
        x_next = x_next - math.expm1(-h) / (2 * r) * (x0_guided - previous.x0_uncond)
    return x_next, state


def trajectory(sampler: str) -> SamplerStep:
    """A fresh step function for one trajectory of ``sampler`` (the host's ``SamplerStep``):
    ``(x, σ, σ_next, ε_u, ε_c, λ) → x_next``; DPM++ 2M keeps its previous step inside."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown CFG++ sampler {sampler!r}; known: {', '.join(SAMPLERS)}")
    previous: DPMpp2MState | None = None

    def step(
        x: torch.Tensor,
        sigma: float,
        sigma_next: float,
        eps_uncond: torch.Tensor,
        eps_cond: torch.Tensor,
        guidance: float,
    ) -> torch.Tensor:
        nonlocal previous
        if sampler == "euler_cfgpp":
            return euler_cfgpp_step(x, sigma, sigma_next, eps_uncond, eps_cond, guidance)
        x_next, previous = dpmpp_2m_cfgpp_step(x, sigma, sigma_next, eps_uncond, eps_cond, guidance, previous)
        return x_next

    return step


def sample(
    denoiser: GuidedDenoiser, x: torch.Tensor, sigmas: Sequence[float], scale: float, sampler: str
) -> torch.Tensor:
    """Run ``sampler`` over ``sigmas`` (decreasing, ending in 0) from the noisy sample ``x``."""
    step = trajectory(sampler)
    for sigma, sigma_next in itertools.pairwise(sigmas):
        x = step(x, sigma, sigma_next, *denoiser(x, sigma), scale)
    return x
