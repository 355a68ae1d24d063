"""First-block cache for transformer denoisers, offered as the ``first_block_cache`` wrapper.

The hook only describes the offer; attaching it (diffusers' cache hooks) lives in
:mod:`diffstack_first_block_cache.cache`, and on the compile offer's transformer in
:mod:`diffstack_first_block_cache.compiled`, imported when a request enables the wrapper.
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
from diffstack_first_block_cache.config import FirstBlockCacheOptions

if TYPE_CHECKING:
    import torch


def _probe(model: ModelInfo) -> Availability:
    if model.denoiser_kind is DenoiserKind.TRANSFORMER:
        return Availability.yes()
    return Availability.no(
        f"first-block cache needs a transformer denoiser; this model ({model.family}) has a "
        f"{model.denoiser_kind}, on which diffusers' hook fails: use deepcache"
    )


def _apply(denoiser: torch.nn.Module, options: Mapping[str, Any]) -> DenoiserWrapper:
    from diffstack_first_block_cache.cache import FirstBlockCacheHandle
    from diffstack_first_block_cache.compiled import CompiledFirstBlockCacheHandle, is_compiled

    threshold = parse_options(FirstBlockCacheOptions, options).threshold
    if is_compiled(denoiser):
        return CompiledFirstBlockCacheHandle(denoiser, threshold)
    return FirstBlockCacheHandle(denoiser, threshold)


@hookimpl
def wrap_denoiser(model: ModelInfo) -> list[DenoiserWrapperOffer]:
    return [
        DenoiserWrapperOffer(
            name="first_block_cache",
            description="First-block cache: skip later blocks while the first block's residual barely moves",
            probe=_probe,
            denoiser_kinds=frozenset({DenoiserKind.TRANSFORMER}),
            apply=_apply,
            options=FirstBlockCacheOptions,
            on_compiled=True,
        )
    ]
