"""The first-block cache's options, declared for :func:`diffstack.options.parse_options`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from diffstack import Ge

DEFAULT_THRESHOLD = 0.08
"""ParaAttention's published setting for FLUX (1.55x on an L20); diffusers' own default is 0.05."""


@dataclass(frozen=True)
class FirstBlockCacheOptions:
    """Options of the ``first_block_cache`` wrapper."""

    threshold: Annotated[float, Ge(0)] = DEFAULT_THRESHOLD
    """Later blocks are skipped while the first block's residual changes by less than this (relative)."""
