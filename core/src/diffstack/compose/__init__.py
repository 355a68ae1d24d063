"""Composition: for each slot, collect every offer, probe it, check its numbers, time it, choose.

Every decision lands in one immutable :class:`~diffstack.types.StackReport`. Nothing a plugin does
here can stop composition: a probe, build or run that raises marks that offer ``failed`` and the
slot falls back to the others (and, for attention, to SDPA).
"""

from __future__ import annotations

import torch

from diffstack.compose.attention import compose_attention
from diffstack.compose.compile import compose_compile
from diffstack.compose.encoder import compose_encoder
from diffstack.compose.sigmas import compose_sigmas
from diffstack.compose.slots import ComposedStack, ModelUnderTest
from diffstack.compose.wrappers import compose_wrappers
from diffstack.config import ComposeSettings
from diffstack.engine.attention import install_attention
from diffstack.plugins import PluginHost

__all__ = ["ComposedStack", "ModelUnderTest", "apply_attention", "compose_stack"]


def compose_stack(host: PluginHost, model: ModelUnderTest, settings: ComposeSettings) -> ComposedStack:
    """Decide every slot in dependency order: attention first, compile last (it captures the rest)."""
    stack = ComposedStack()
    compose_attention(host, model, settings, stack)
    apply_attention(model.denoiser, stack)
    with torch.inference_mode():
        model.reference_output = model.denoiser(**model.denoiser_inputs, return_dict=False)[0]
    compose_sigmas(host, model, stack)
    compose_encoder(host, model, stack)
    compose_wrappers(host, model, stack)
    compose_compile(host, model, settings, stack)
    return stack


def apply_attention(denoiser: torch.nn.Module, stack: ComposedStack) -> None:
    """Put the chosen kernels in place: processors per module (UNets) or the dispatch backend."""
    if stack.attention_backend is not None:
        denoiser.set_attention_backend(stack.attention_backend)  # type: ignore[operator]
    elif stack.attention_plan:
        install_attention(denoiser, stack.attention_plan)
