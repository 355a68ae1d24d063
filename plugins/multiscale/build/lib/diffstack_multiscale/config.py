"""Multi-scale diffusion's options and presets, declared for ``parse_options`` (no torch imported)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated

from diffstack import Ge, Gt, Le, OptionProblem, OptionsError

MIN_LATENT_SIDE = 4
"""The smallest downscaled latent side served: below it an SD UNet's second downsampler already
works on a single latent pixel, and the coarse steps draw nothing but a colour."""

PRESETS: dict[str, dict[str, float | int]] = {
    "quality": {"factor": 0.5, "full_res_start": 2, "full_res_below": 0.5, "intermittent": 2},
    "speed": {"factor": 0.5, "full_res_start": 1, "full_res_below": 0.3, "intermittent": 0},
}
"""``quality`` keeps the first two steps, every second coarse step and the second half of the noise
range at full size; ``speed`` only the first step and the last 30 % of the noise range."""


@dataclass(frozen=True)
class MultiScaleOptions:
    """Options of the ``multiscale`` wrapper; a field left unset takes the preset's value.

    The late, full-size phase is given as a noise level, not a step count, because a denoiser
    wrapper never sees the number of steps: a call whose timestep is below ``full_res_below`` of the
    training range (1000 for every SD-family scheduler) runs at full size. With the usual evenly
    spaced timesteps, ``full_res_below = 0.3`` is the last 30 % of the steps.
    """

    preset: str = "quality"
    """``quality`` or ``speed``: the values of the options below that are left unset."""
    factor: Annotated[float, Gt(0), Le(0.75)] | None = None
    """Downscale factor of each latent side on the coarse steps (0.5 halves them)."""
    full_res_start: Annotated[int, Ge(0)] | None = None
    """How many of the first steps run at full size (they fix the composition)."""
    full_res_below: Annotated[float, Ge(0), Le(1)] | None = None
    """Calls below this fraction of the noise range run at full size (the late, detailed steps)."""
    intermittent: Annotated[int, Ge(0)] | None = None
    """Every ``intermittent``-th step of the coarse phase runs at full size (0: none)."""

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            problem = f"unknown preset {self.preset!r}; choose one of {sorted(PRESETS)}"
            raise OptionsError([OptionProblem("preset", problem)])

    def setting(self, name: str) -> float:
        """An option's value: the request's or admin's, else the preset's."""
        value = getattr(self, name)
        return float(PRESETS[self.preset][name] if value is None else value)

    def latent_problem(self, latent_height: int, latent_width: int) -> OptionProblem | None:
        """Why this size cannot be served (the downscaled latent is too small), naming the option."""
        factor = self.setting("factor")
        small = min(coarse_side(latent_height, factor), coarse_side(latent_width, factor))
        if small >= MIN_LATENT_SIDE:
            return None
        option = "factor" if self.factor is not None else "preset"
        return OptionProblem(
            option,
            f"a {latent_width}x{latent_height} latent scaled by {factor} has a side of {small}, "
            f"below the {MIN_LATENT_SIDE} latent pixels multi-scale needs: ask for a larger image "
            "or a larger factor",
        )


def coarse_side(side: int, factor: float) -> int:
    """A latent side on the coarse steps."""
    return max(1, math.floor(side * factor))
