"""Composition: for each slot, collect every offer, probe it, check its numbers, time it, choose.

Each ``compose_*`` returns its slot's decision; :func:`compose_stack` assembles them into one frozen
:class:`ComposedStack` whose report explains every choice. Nothing a plugin does here can stop
composition: a probe, build or run that raises or overruns its limit marks that offer ``failed`` or
``timed out`` and the slot falls back to the others (and, for attention, to SDPA).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from diffstack.compose.attention import AttentionDecision, compose_attention
from diffstack.compose.compile import compose_compile, compose_vae_compile
from diffstack.compose.encoder import compose_encoder
from diffstack.compose.samplers import compose_samplers
from diffstack.compose.sigmas import compose_sigmas
from diffstack.compose.slots import ModelUnderTest
from diffstack.compose.wrappers import compose_wrappers
from diffstack.config import ComposeSettings
from diffstack.plugins import PluginHost
from diffstack.types import (
    AttentionFn,
    DenoiserWrapperOffer,
    PromptEncoder,
    SamplerOffer,
    SigmasOffer,
    SlotReport,
)

__all__ = ["AttentionApplier", "AttentionDecision", "ComposedStack", "ModelUnderTest", "compose_stack"]

AttentionApplier = Callable[[torch.nn.Module, AttentionDecision], None]
"""Puts the chosen attention in place on a denoiser: the engine's job, handed in so composition never
imports the engine."""


@dataclass(frozen=True)
class ComposedStack:
    """Every slot's decision, ready for the engine to apply, and the reports that explain them."""

    slots: tuple[SlotReport, ...]
    attention_plan: Mapping[str, tuple[str, AttentionFn]]
    attention_backend: str | None
    compiled: torch.nn.Module | None
    schedules: Mapping[str, SigmasOffer]
    custom_schedules: frozenset[str]
    """Schedules that pass their own sigmas (so they need a sampler that takes ``sigmas=``)."""
    auto_schedule: str
    samplers: Mapping[str, SamplerOffer]
    """Plugin samplers requests may name, beside the engine's own."""
    encoder: PromptEncoder
    encoder_chain: tuple[PromptEncoder, ...]
    wrappers: Mapping[str, DenoiserWrapperOffer]
    notes: tuple[str, ...] = ()
    """Decisions worth a line in the report beyond each slot's choice (attention fallback orders)."""
    vae_decode: torch.nn.Module | None = None
    """The ``compile_vae`` slot's module (``module(latents)`` decodes), or None for the VAE's own."""


def compose_stack(
    host: PluginHost, model: ModelUnderTest, settings: ComposeSettings, apply_attention: AttentionApplier
) -> ComposedStack:
    """Decide every slot in dependency order: attention first, compile last (it captures the rest).

    The later slots are checked against ``reference``: the denoiser's output with the chosen
    attention in place.
    """
    attention = compose_attention(host, model, settings)
    apply_attention(model.denoiser, attention)
    reference = model.denoise()
    sigmas = compose_sigmas(host, model, settings)
    samplers = compose_samplers(host, model, settings)
    encoder = compose_encoder(host, model, settings)
    wrappers = compose_wrappers(host, model, settings)
    compiled = compose_compile(host, model, settings, reference)
    vae = compose_vae_compile(host, model, settings)
    slots = (
        attention.report,
        sigmas.report,
        samplers.report,
        encoder.report,
        wrappers.report,
        compiled.report,
    )
    return ComposedStack(
        slots=(*slots, vae.report) if model.vae is not None else slots,
        attention_plan=attention.plan,
        attention_backend=attention.backend,
        compiled=compiled.compiled,
        schedules=sigmas.schedules,
        custom_schedules=sigmas.custom,
        auto_schedule=sigmas.auto,
        samplers=samplers.samplers,
        encoder=encoder.encoder,
        encoder_chain=encoder.chain,
        wrappers=wrappers.wrappers,
        notes=attention.notes,
        vae_decode=vae.compiled,
    )
