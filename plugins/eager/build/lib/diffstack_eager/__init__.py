"""Eager execution: the denoiser as diffusers built it, the baseline compiled offers must beat."""

from __future__ import annotations

import torch

from diffstack import CompileOffer, ModelInfo, hookimpl


def _as_is(denoiser: torch.nn.Module, model: ModelInfo) -> torch.nn.Module:
    return denoiser


@hookimpl
def compile_model(model: ModelInfo) -> list[CompileOffer]:
    return [CompileOffer(name="eager", description="PyTorch eager mode, no compilation", build=_as_is)]
