"""stable-fast's UNet compiler, applied to a proxy so the shared denoiser keeps its own ``forward``."""

from __future__ import annotations

from typing import Any

import torch

from diffstack_stable_fast.config import StableFastOptions


class StableFastUNet(torch.nn.Module):
    """The denoiser behind a forward that stable-fast replaces with its traced one.

    stable-fast compiles by assigning ``module.forward``; doing that on the denoiser itself would
    also change the eager and torch.compile candidates built from the same module. Every attribute
    the pipeline reads (``config``, ``dtype``, ``add_embedding``...) is the denoiser's.
    """

    def __init__(self, denoiser: torch.nn.Module) -> None:
        super().__init__()
        self.denoiser = denoiser

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.denoiser(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "denoiser":  # not set yet (during __init__): no recursion
                raise
            return getattr(self.denoiser, name)


def compile_unet(denoiser: torch.nn.Module, options: StableFastOptions) -> torch.nn.Module:
    """The UNet under stable-fast: traced and frozen on the first call per input shape."""
    from sfast.compilers.diffusion_pipeline_compiler import CompilationConfig
    from sfast.compilers.diffusion_pipeline_compiler import compile_unet as sfast_compile_unet

    config = CompilationConfig.Default()
    # Its xformers switch patches xformers process-wide and replaces the host's attention processors.
    config.enable_xformers = False
    config.enable_cuda_graph = options.cuda_graph
    config.enable_triton = options.triton
    config.preserve_parameters = options.preserve_parameters
    config.prefer_lowp_gemm = options.prefer_lowp_gemm
    return sfast_compile_unet(StableFastUNet(denoiser), config)
