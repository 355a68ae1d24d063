"""SpargeAttn's options, read from ``[plugins.options.sparge]`` and checked before anything runs."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

Method = Literal["topk", "cdf"]


@dataclass(frozen=True)
class SpargeConfig:
    """How many key blocks each query block keeps. Defaults are upstream's, except ``topk`` (see README)."""

    method: Method = "topk"
    """``topk``: keep a fixed fraction of key blocks; ``cdf``: keep ``cdfthreshd`` of the attention mass."""
    topk: float = 0.5
    """Fraction of key blocks each query block attends to (``topk`` method)."""
    cdfthreshd: float = 0.98
    """Cumulative attention mass to keep (``cdf`` method)."""
    simthreshd1: float | None = None
    """Self-similarity below which a query block stays dense; ``None``: upstream's -0.1 (topk), 0.6 (cdf)."""
    pvthreshd: float = 50
    """Threshold for skipping P·V of blocks whose weights are negligible."""

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> SpargeConfig:
        """Parse and check an admin's options; a ``ValueError`` names the bad option."""
        unknown = set(options) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown option(s) {', '.join(sorted(unknown))}")
        config = cls(**options)
        if config.method not in ("topk", "cdf"):
            raise ValueError(f"option method must be 'topk' or 'cdf', got {config.method!r}")
        if not 0 < config.topk <= 1:
            raise ValueError(f"option topk must be in (0, 1], got {config.topk}")
        if not 0 < config.cdfthreshd <= 1:
            raise ValueError(f"option cdfthreshd must be in (0, 1], got {config.cdfthreshd}")
        return config

    def kernel_arguments(self) -> dict[str, Any]:
        """Keyword arguments for the chosen ``spas_sage2_attn_meansim*_cuda`` function."""
        if self.method == "topk":
            arguments: dict[str, Any] = {"topk": self.topk, "simthreshd1": -0.1}
        else:
            arguments = {"cdfthreshd": self.cdfthreshd, "simthreshd1": 0.6}
        if self.simthreshd1 is not None:
            arguments["simthreshd1"] = self.simthreshd1
        arguments["pvthreshd"] = self.pvthreshd
        return arguments
