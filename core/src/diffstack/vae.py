"""The VAE decode as a module of its own, so a compile offer can target it and the engine can route
the pipeline's ``vae.decode`` through whichever module the ``compile_vae`` slot chose."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch


class VaeDecode(torch.nn.Module):
    """``module(latents)`` is ``vae.decode(latents, return_dict=False)[0]``, always the VAE class's own
    decode (never a routed one), so it stays the eager reference while a compiled copy is installed."""

    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        decoded: torch.Tensor = type(self.vae).decode(self.vae, latents, return_dict=False)[0]  # type: ignore[attr-defined]
        return decoded


@contextlib.contextmanager
def routed_decode(vae: torch.nn.Module, decode: torch.nn.Module) -> Iterator[None]:
    """For the duration, ``vae.decode(latents, ...)`` runs ``decode(latents)`` (the pipeline's calls
    pass ``return_dict`` and, for SD1.5, ``generator``, which a plain decode ignores)."""
    from diffusers.models.autoencoders.vae import DecoderOutput

    def routed(latents: torch.Tensor, return_dict: bool = True, generator: Any = None) -> Any:
        sample = decode(latents.to(_dtype_of(vae)))
        return DecoderOutput(sample=sample) if return_dict else (sample,)

    object.__setattr__(vae, "decode", routed)  # an instance attribute shadows the method
    try:
        yield
    finally:
        del vae.decode


def _dtype_of(module: torch.nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype
