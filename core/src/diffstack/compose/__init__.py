"""Composition: for each slot, collect every offer, probe it, check its numbers, time it, choose.

Every decision lands in one immutable :class:`~diffstack.types.StackReport`. Nothing a plugin does
here can stop composition: a probe, build or run that raises marks that offer ``failed`` and the
slot falls back to the others (and, for attention, to SDPA).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from diffstack.compose.attention import compose_attention
from diffstack.compose.compile import compose_compile
from diffstack.compose.encoder import compose_encoder
from diffstack.compose.sigmas import compose_sigmas
from diffstack.compose.slots import ComposedStack, ModelUnderTest
from diffstack.compose.wrappers import compose_wrappers
from diffstack.config import ComposeSettings
from diffstack.plugins import PluginHost

__all__ = ["AttentionApplier", "ComposedStack", "ModelUnderTest", "compose_stack"]

AttentionApplier = Callable[[torch.nn.Module, ComposedStack], None]
"""Puts the chosen attention in place on a denoiser: the engine's job, handed in so compose never
imports the engine."""


def compose_stack(
    host: PluginHost,
    model: ModelUnderTest,
    settings: ComposeSettings,
    apply_attention: AttentionApplier,
) -> ComposedStack:
    """Decide every slot in dependency order: attention first, compile last (it captures the rest).

    The later slots are measured against the denoiser with the chosen attention in place.
    """
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
