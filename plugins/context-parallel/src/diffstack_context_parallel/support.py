"""The probes (is this process one rank of a group that can split a step?) and the offers' builds."""

from __future__ import annotations

from typing import TYPE_CHECKING

from diffstack import Availability, Built, DenoiserKind, ModelInfo, OptionsError, parse_options
from diffstack_context_parallel.config import OPTIONS, ContextParallelOptions

if TYPE_CHECKING:
    import torch

MODES = {
    "ulysses": "Ulysses context parallelism: all-to-all of heads, every GPU attends over the whole sequence",
    "ring": "Ring attention: each GPU keeps its slice of the sequence and passes keys and values around",
}


def probe(mode: str, model: ModelInfo) -> Availability:
    """Yes on one rank of an initialised process group of ≥ 2 processes, one GPU each."""
    import torch
    import torch.distributed as dist

    try:
        options = parse_options(ContextParallelOptions, model.plugin_options(OPTIONS))
    except OptionsError as exc:
        return Availability.no(f"bad [plugins.options.{OPTIONS}]: {exc}")
    if not options.wanted(mode):
        return Availability.no(f"not in [plugins.options.{OPTIONS}] modes = {options.modes!r}")
    if model.denoiser_kind is not DenoiserKind.TRANSFORMER:
        return Availability.no(
            f"context parallelism splits a transformer's sequence; this model ({model.family}) has a "
            f"{model.denoiser_kind}"
        )
    if not dist.is_available() or not dist.is_initialized():
        return Availability.no(
            "needs a torch.distributed process group: start the server with "
            "`diffstack serve --context-parallel N` (one process per GPU)"
        )
    world = dist.get_world_size()
    if world < 2:
        return Availability.no(f"the process group has {world} process; context parallelism needs 2 or more")
    if model.is_cuda:
        visible = torch.cuda.device_count()
        if visible < 2:
            return Availability.no(f"needs ≥ 2 visible GPUs, found {visible} (CUDA_VISIBLE_DEVICES?)")
    elif not options.allow_cpu:
        return Availability.no(
            f"splits a step across GPUs; this model runs on {model.device} "
            f"(allow_cpu = true accepts a gloo group, for tests)"
        )
    elif mode == "ring":
        return Availability.no(
            "ring attention needs an attention kernel that returns its log-sum-exp (cuDNN, flash): "
            "CUDA only; on the CPU only Ulysses runs"
        )
    setting = "compiled" if options.compile else "eager"
    return Availability.yes(f"{mode} over {world} ranks ({dist.get_backend()}), {setting}")


def build(mode: str, denoiser: torch.nn.Module, model: ModelInfo) -> Built[torch.nn.Module]:
    from diffstack_context_parallel.parallel import parallel_denoiser

    options = parse_options(ContextParallelOptions, model.plugin_options(OPTIONS))
    return parallel_denoiser(denoiser, mode, compile_it=options.compile)
