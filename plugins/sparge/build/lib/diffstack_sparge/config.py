"""SpargeAttn's options, read from ``[plugins.options.sparge]`` and checked before anything runs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from diffstack import Interval

Method = Literal["topk", "cdf"]


@dataclass(frozen=True)
class SpargeConfig:
    """How many key blocks each query block keeps. Defaults are upstream's, except ``topk`` (see README)."""

    method: Method = "topk"
    """``topk``: keep a fixed fraction of key blocks; ``cdf``: keep ``cdfthreshd`` of the attention mass."""
    topk: Annotated[float, Interval(gt=0, le=1)] = 0.5
    """Fraction of key blocks each query block attends to (``topk`` method)."""
    cdfthreshd: Annotated[float, Interval(gt=0, le=1)] = 0.98
    """Cumulative attention mass to keep (``cdf`` method)."""
    simthreshd1: float | None = None
    """Self-similarity below which a query block stays dense; ``None``: upstream's -0.1 (topk), 0.6 (cdf)."""
    pvthreshd: float = 50
    """Threshold for skipping P·V of blocks whose weights are negligible."""

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
