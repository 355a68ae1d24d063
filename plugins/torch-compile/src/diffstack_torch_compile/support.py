"""The probe (can inductor compile for this device, with these options?) and the offer's build."""

from __future__ import annotations

import shutil

import torch

from diffstack import Availability, Built, ModelInfo, OptionsError, needs_module, parse_options
from diffstack_torch_compile.config import CompileConfig

OPTIONS = "torch_compile"


def probe(model: ModelInfo) -> Availability:
    config = _config(model)
    if isinstance(config, Availability):
        return config
    return _probe(model, config)


def probe_vae(model: ModelInfo) -> Availability:
    config = _config(model)
    if isinstance(config, Availability):
        return config
    if not config.compile_vae:
        return Availability.no("compile_vae = false in [plugins.options.torch_compile]")
    return _probe(model, config)


def probe_fp8(model: ModelInfo) -> Availability:
    from diffstack_torch_compile.fp8 import probe_fp8 as fp8_answer

    config = _config(model)
    if isinstance(config, Availability):
        return config
    answer = fp8_answer(model, config)
    return _probe(model, config) if answer.ok else answer


def _config(model: ModelInfo) -> CompileConfig | Availability:
    try:
        return parse_options(CompileConfig, model.plugin_options(OPTIONS))
    except OptionsError as exc:
        return Availability.no(f"bad [plugins.options.torch_compile]: {exc}")


def _probe(model: ModelInfo, config: CompileConfig) -> Availability:
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


def build_vae(vae: torch.nn.Module, model: ModelInfo) -> Built[torch.nn.Module]:
    from diffstack_torch_compile.compiler import compile_vae_decode

    return compile_vae_decode(vae, model, parse_options(CompileConfig, model.plugin_options(OPTIONS)))


def build_fp8(denoiser: torch.nn.Module, model: ModelInfo) -> Built[torch.nn.Module]:
    from diffstack_torch_compile.fp8 import build_fp8 as fp8_build

    return fp8_build(denoiser, model, parse_options(CompileConfig, model.plugin_options(OPTIONS)))
