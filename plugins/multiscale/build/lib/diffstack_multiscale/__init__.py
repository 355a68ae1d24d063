"""Multi-scale diffusion for UNet denoisers, offered as the ``multiscale`` denoiser wrapper.

The early steps lay out where things go and need little resolution; the late steps draw detail. So
the coarse phase runs on a latent downscaled by ``factor`` (a quarter of the pixels at 0.5) and the
first, late and intermittent steps run at full size. Presets and options: :mod:`.config`; the hooks:
:mod:`.wrapper`, imported only when a request enables the wrapper.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from diffstack import (
    Availability,
    DenoiserKind,
    DenoiserWrapper,
    DenoiserWrapperOffer,
    ModelInfo,
    OptionProblem,
    hookimpl,
    parse_options,
)
from diffstack_multiscale.config import MultiScaleOptions

if TYPE_CHECKING:
    import torch


def _probe(model: ModelInfo) -> Availability:
    if model.denoiser_kind is DenoiserKind.UNET:
        return Availability.yes()
    return Availability.no(
        f"multi-scale resizes a UNet's spatial latent; this model ({model.family}) has a "
        f"{model.denoiser_kind}, whose packed tokens it does not resize"
    )


def _apply(denoiser: torch.nn.Module, options: Mapping[str, Any]) -> DenoiserWrapper:
    from diffstack_multiscale.wrapper import MultiScale

    return MultiScale(denoiser, parse_options(MultiScaleOptions, options))


def _check_latent(options: MultiScaleOptions, latent_height: int, latent_width: int) -> OptionProblem | None:
    return options.latent_problem(latent_height, latent_width)


@hookimpl
def wrap_denoiser(model: ModelInfo) -> list[DenoiserWrapperOffer]:
    return [
        DenoiserWrapperOffer(
            name="multiscale",
            description="multi-scale diffusion: early steps on a downscaled latent, late steps at full size",
            probe=_probe,
            denoiser_kinds=frozenset({DenoiserKind.UNET}),
            apply=_apply,
            options=MultiScaleOptions,
            check_latent=_check_latent,
        )
    ]
