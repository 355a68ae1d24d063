"""DeepCache for UNet denoisers, offered as the ``deepcache`` denoiser wrapper.

The hook only describes the offer; the caching hooks live in :mod:`diffstack_deepcache.hooks`,
imported when a request enables the wrapper.
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
    hookimpl,
    parse_options,
)
from diffstack_deepcache.config import DeepCacheConfig

if TYPE_CHECKING:
    import torch


def _probe(model: ModelInfo) -> Availability:
    if model.denoiser_kind is DenoiserKind.UNET:
        return Availability.yes()
    return Availability.no(
        f"DeepCache needs a UNet denoiser; this model ({model.family}) has a {model.denoiser_kind}: "
        "use first_block_cache"
    )


def _apply(denoiser: torch.nn.Module, options: Mapping[str, Any]) -> DenoiserWrapper:
    from diffstack_deepcache.compiled import CompiledDeepCacheHandle, is_compiled
    from diffstack_deepcache.hooks import apply_deep_cache

    config = parse_options(DeepCacheConfig, options)
    if is_compiled(denoiser):
        return CompiledDeepCacheHandle(denoiser, config)
    return apply_deep_cache(denoiser, config)


@hookimpl
def wrap_denoiser(model: ModelInfo) -> list[DenoiserWrapperOffer]:
    return [
        DenoiserWrapperOffer(
            name="deepcache",
            description="DeepCache: reuse the UNet's deep features between full steps",
            probe=_probe,
            denoiser_kinds=frozenset({DenoiserKind.UNET}),
            apply=_apply,
            options=DeepCacheConfig,
            on_compiled=True,
        )
    ]
