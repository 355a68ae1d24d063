"""SageAttention's options, read from ``[plugins.options.sage]``, and the 2.x kernels they name."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Kernel = Literal["auto", "fp8_sm90", "fp8_cuda", "fp16_cuda", "fp16_triton"]


@dataclass(frozen=True)
class SageConfig:
    """Which SageAttention kernel serves the offer."""

    kernel: Kernel = "auto"
    """``auto``: ``sageattn``, which picks the kernel for the GPU (1.x: its only Triton kernel; 2.x on
    Hopper: ``fp8_sm90``). The others name one 2.x kernel: ``fp8_sm90`` (INT8 Q·K, FP8 P·V, sm90
    only), ``fp8_cuda`` (the same for sm89+), ``fp16_cuda`` (FP16 P·V, sm80+), ``fp16_triton``."""


@dataclass(frozen=True)
class KernelSpec:
    """One sageattention 2.x entry point: its name, diffusers' backend for it, and what it needs."""

    function: str
    diffusers_backend: str
    capabilities: tuple[tuple[int, int], tuple[int, int] | None]
    """Lowest and (when bounded) highest compute capability it runs on."""
    extension: str | None
    """``sageattention.core``'s flag saying its compiled module was built and imports (``None``: Triton)."""


KERNELS: dict[str, KernelSpec] = {
    "auto": KernelSpec("sageattn", "sage", ((8, 0), None), None),
    "fp8_sm90": KernelSpec(
        "sageattn_qk_int8_pv_fp8_cuda_sm90",
        "_sage_qk_int8_pv_fp8_cuda_sm90",
        ((9, 0), (9, 0)),
        "SM90_ENABLED",
    ),
    "fp8_cuda": KernelSpec(
        "sageattn_qk_int8_pv_fp8_cuda", "_sage_qk_int8_pv_fp8_cuda", ((8, 9), None), "SM89_ENABLED"
    ),
    "fp16_cuda": KernelSpec(
        "sageattn_qk_int8_pv_fp16_cuda", "_sage_qk_int8_pv_fp16_cuda", ((8, 0), None), "SM80_ENABLED"
    ),
    "fp16_triton": KernelSpec(
        "sageattn_qk_int8_pv_fp16_triton", "_sage_qk_int8_pv_fp16_triton", ((8, 0), None), None
    ),
}
"""The 2.x kernels by option value; diffusers 0.42 registers a backend for each (``sage`` and its
private ``_sage_*`` names)."""

AUTO_PICKS: dict[tuple[int, int], str] = {
    (8, 0): "fp16_cuda",
    (8, 6): "fp16_triton",
    (8, 9): "fp8_cuda",
    (9, 0): "fp8_sm90",
    (12, 0): "fp8_cuda",
    (12, 1): "fp8_cuda",
}
"""What 2.x's ``sageattn`` dispatches to per compute capability (upstream's ``core.sageattn``, which
raises for any other)."""
