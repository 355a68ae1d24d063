"""The fp8 variant: torchao float8 dynamic activation x float8 weight GEMMs, compiled.

Built on its own copy of the denoiser (the eager one stays the reference and the other offers'
model), quantized after the layout and projection changes, then compiled: torchao's fp8 in eager
mode is slower than bf16 (the scaling runs as separate kernels); compiled, inductor fuses the
activation scaling into the preceding ops and the GEMMs run as ``torch._scaled_mm``. Lossy by
design: the host accepts it only within ``compose.lossy_tolerance`` and reports its drift.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch

from diffstack import Availability, Built, ModelInfo, needs_module
from diffstack_torch_compile.config import CompileConfig

MIN_CAPABILITY = (8, 9)
"""fp8 tensor cores: Ada (8.9) and Hopper (9.0) onwards."""


def probe_fp8(model: ModelInfo, config: CompileConfig) -> Availability:
    """Yes on a CUDA GPU of compute capability 8.9 or more with torchao importable."""
    if not config.fp8:
        return Availability.no(
            "fp8 = false in [plugins.options.torch_compile] (the default: its compile is not yet bounded)"
        )
    if not model.is_cuda:
        return Availability.no(
            f"fp8 GEMMs need a CUDA GPU of compute capability >= 8.9 (Ada, Hopper), found {model.device}"
        )
    capability = torch.cuda.get_device_capability(model.device)
    if capability < MIN_CAPABILITY:
        found = ".".join(map(str, capability))
        return Availability.no(f"fp8 GEMMs need compute capability >= 8.9, this GPU has {found}")
    torchao = needs_module("torchao", "pip install torchao (0.18 pairs with torch 2.11)")
    if not torchao.ok:
        return torchao
    return Availability.yes(f"compute capability {'.'.join(map(str, capability))}, torchao present")


def worth_fp8(min_features: int) -> Callable[[torch.nn.Module, str], bool]:
    """Linear layers big enough for fp8 to pay for scaling its activations (dims multiples of 16,
    as ``_scaled_mm`` needs)."""

    def keep(module: torch.nn.Module, name: str) -> bool:
        if not isinstance(module, torch.nn.Linear):
            return False
        dims = (module.in_features, module.out_features)
        return min(dims) >= min_features and all(d % 16 == 0 for d in dims)

    return keep


def quantizer(model: ModelInfo, config: CompileConfig) -> Callable[[torch.nn.Module], str]:
    """Quantize a denoiser's big Linear layers in place: per-row scales in bf16; per-tensor in fp16,
    where ``_scaled_mm``'s row-wise scaling has no half-precision output."""

    def quantize(denoiser: torch.nn.Module) -> str:
        from torchao.quantization import (
            Float8DynamicActivationFloat8WeightConfig,
            PerRow,
            PerTensor,
            quantize_,
        )

        per_row = model.dtype == torch.bfloat16
        granularity = PerRow() if per_row else PerTensor()
        keep = worth_fp8(config.fp8_min_features)
        count = sum(1 for name, module in denoiser.named_modules() if keep(module, name))
        quantize_(
            denoiser, Float8DynamicActivationFloat8WeightConfig(granularity=granularity), filter_fn=keep
        )
        scales = "per-row" if per_row else "per-tensor"
        return (
            f"fp8 e4m3 GEMMs ({scales} scales) in {count} Linear layers "
            f"of >= {config.fp8_min_features} features"
        )

    return quantize


def build_fp8(denoiser: torch.nn.Module, model: ModelInfo, config: CompileConfig) -> Built[torch.nn.Module]:
    from diffstack_torch_compile.compiler import compile_denoiser

    own = copy.deepcopy(denoiser)
    return compile_denoiser(own, model, config, quantize=quantizer(model, config))
