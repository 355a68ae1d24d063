"""The options of ``[plugins.options.stable_fast]``, checked by the probe before anything compiles."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StableFastOptions:
    """stable-fast's switches that matter for serving; everything else keeps upstream's defaults."""

    cuda_graph: bool = True
    """Capture one CUDA graph per input shape: the main win at small batches (launch-bound)."""
    triton: bool = True
    """Use stable-fast's Triton kernels (group norm, layer norm, reshapes); needs Triton."""
    preserve_parameters: bool = True
    """Keep weights as parameters when freezing, so LoRA weights can still be swapped in."""
    prefer_lowp_gemm: bool = True
    """Fuse linear+add into half-precision GEMMs (upstream's default)."""
