"""The probe (can inductor compile for this device, with these options?) and the offer's build."""

from __future__ import annotations

import shutil

import torch

from diffstack import Availability, Built, ModelInfo, OptionsError, needs_module, parse_options
from diffstack_torch_compile.config import CompileConfig

OPTIONS = "torch_compile"


def probe(model: ModelInfo) -> Availability:
    try:
        config = parse_options(CompileConfig, model.plugin_options(OPTIONS))
    except OptionsError as exc:
        return Availability.no(f"bad [plugins.options.torch_compile]: {exc}")
    mode = config.resolved_mode(model.device)
    if mode.startswith("max-autotune") and not config.allow_max_autotune:
        return Availability.no(
            f"mode {mode} compiled the SD1.5 UNet for more than 8 minutes on an H100; "
            "set allow_max_autotune = true to accept that, or use reduce-overhead"
        )
    if not model.is_cuda and not config.allow_cpu:
        return Availability.no(
            f"compiles for CUDA only by default, found {model.device}; set allow_cpu = true to compile "
            "for the CPU (a minute or more at each cold start)"
        )
    triton = needs_module("triton", "inductor needs it for CUDA: pip install the version your torch pins")
    if model.is_cuda and not triton.ok:
        return triton
    if not model.is_cuda and not any(shutil.which(cxx) for cxx in ("g++", "clang++", "c++")):
        return Availability.no("inductor needs a C++ compiler for CPU code: apt-get install g++")
    return Availability.yes(f"mode {mode}, cache {config.cache_path}")


def build(denoiser: torch.nn.Module, model: ModelInfo) -> Built[torch.nn.Module]:
    from diffstack_torch_compile.compiler import compile_denoiser

    return compile_denoiser(denoiser, model, parse_options(CompileConfig, model.plugin_options(OPTIONS)))
