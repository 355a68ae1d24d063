"""The scheduler's own sigmas (``default``), Karras et al.'s sigmas (``karras``), and diffstack's own
flow-matching schedule (``flow_arcsine``) for FLUX.

``default`` has the higher priority so that, with only the baseline plugins installed, ``auto``
gives exactly what plain diffusers gives.
"""

from __future__ import annotations

import math
from typing import Any

from diffstack import Family, ModelInfo, SigmasOffer, hookimpl

KARRAS_RHO = 7.0


def own_sigmas(steps: int, scheduler: Any) -> None:
    """None tells the engine to let the scheduler compute its own."""
    return None


def karras_sigmas(steps: int, scheduler: Any) -> list[float]:
    """Karras et al. (2022), eq. 5, between the model's trained sigma range; the final 0 appended."""
    import torch

    alphas = scheduler.alphas_cumprod.to(torch.float64)
    trained = ((1 - alphas) / alphas) ** 0.5
    sigma_min, sigma_max = float(trained.min()), float(trained.max())
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    low, high = sigma_min ** (1 / KARRAS_RHO), sigma_max ** (1 / KARRAS_RHO)
    sigmas = (high + ramp * (low - high)) ** KARRAS_RHO
    return [*sigmas.tolist(), 0.0]


def arcsine_flow_sigmas(steps: int, scheduler: Any) -> list[float]:
    """diffstack's flow-matching schedule: t_i = (1 + cos(pi i / steps)) / 2, the quantiles of the
    arcsine law (Beta(1/2, 1/2)), so steps crowd at both ends of the flow, where one Euler step errs
    most: the first steps lay out the picture, the last sharpen its edges (the default's last jump,
    from 1/steps to 0, blurs them). Before the scheduler's own shift, which it applies to any sigmas
    it is given (FLUX's resolution-dependent shift), exactly as to its default linspace(1, 1/steps)."""
    ramp = [(1 + math.cos(math.pi * i / steps)) / 2 for i in range(steps)]
    return [*ramp, 0.0]


@hookimpl
def build_sigmas(model: ModelInfo) -> list[SigmasOffer]:
    return [
        SigmasOffer(name="default", priority=10, description="the scheduler's own sigmas", build=own_sigmas),
        SigmasOffer(
            name="karras",
            priority=0,
            description="Karras sigmas (rho 7) over the model's trained range",
            families=frozenset({Family.SD1, Family.SD2, Family.SDXL}),
            build=karras_sigmas,
        ),
        SigmasOffer(
            name="flow_arcsine",
            priority=0,
            description="diffstack's flow-matching schedule: arcsine-spaced steps, dense at both ends",
            families=frozenset({Family.FLUX}),
            build=arcsine_flow_sigmas,
        ),
    ]
