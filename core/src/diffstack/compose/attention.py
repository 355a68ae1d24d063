"""select_attention: per attention shape, probe → relative error vs float32 SDPA → fastest."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch

from diffstack.attention import backend_kernel, sdpa
from diffstack.compose.slots import (
    ComposedStack,
    ModelUnderTest,
    SlotRecorder,
    guard,
    pick_fastest,
    valid_offers,
)
from diffstack.config import ComposeSettings
from diffstack.plugins import OfferFrom, PluginHost
from diffstack.timing import median_ms, relative_error
from diffstack.types import (
    AttentionFn,
    AttentionOffer,
    AttentionShape,
    Availability,
    CandidateStatus,
    DenoiserKind,
    ModelInfo,
)


def compose_attention(
    host: PluginHost, model: ModelUnderTest, settings: ComposeSettings, stack: ComposedStack
) -> None:
    slot = SlotRecorder("select_attention")
    built: list[tuple[OfferFrom, AttentionOffer, AttentionFn]] = []
    transformer = model.info.denoiser_kind is DenoiserKind.TRANSFORMER
    for source, offer in valid_offers(host, "select_attention", AttentionOffer, model, slot):
        if transformer and offer.diffusers_backend is None:
            slot.add(
                source,
                CandidateStatus.REJECTED,
                "offers no diffusers attention backend for transformer models",
            )
            continue
        kernel = (
            guard("build", backend_kernel, offer.diffusers_backend)
            if transformer and offer.diffusers_backend
            else guard("build", offer.build, model.info)
        )
        if isinstance(kernel, str):
            slot.add(source, CandidateStatus.FAILED, kernel)
        else:
            built.append((source, offer, kernel))

    distinct = sorted(set(model.module_shapes.values()), key=lambda s: s.key)
    scopes = [(f"all {len(distinct)} shapes", distinct)] if transformer else [(s.key, [s]) for s in distinct]
    for scope, shapes in scopes:
        winner = _decide_attention(slot, scope, shapes, built, model, settings)
        if winner is None:
            continue
        slot.chosen.append(f"{winner[1].name}" if transformer else f"{scope}: {winner[1].name}")
        if transformer:
            stack.attention_backend = winner[1].diffusers_backend
        else:
            for module_name, shape in model.module_shapes.items():
                if shape in shapes:
                    stack.attention_plan[module_name] = (winner[1].name, winner[2])
    stack.slots.append(slot.report())


def _decide_attention(
    slot: SlotRecorder,
    scope: str,
    shapes: Sequence[AttentionShape],
    built: list[tuple[OfferFrom, AttentionOffer, AttentionFn]],
    model: ModelUnderTest,
    settings: ComposeSettings,
) -> tuple[OfferFrom, AttentionOffer, AttentionFn] | None:
    inputs = [_qkv(shape, settings.batch, model.info) for shape in shapes]
    references = [sdpa(*(t.float() for t in qkv)) for qkv in inputs]
    passing: list[tuple[tuple[OfferFrom, AttentionOffer, AttentionFn], float, float | None]] = []
    for candidate in built:
        source, offer, kernel = candidate
        unsupported = [s for s in shapes if not _supports(offer, s).ok]
        if unsupported:
            slot.add(source, CandidateStatus.REJECTED, _supports(offer, unsupported[0]).reason, scope=scope)
            continue
        errors = guard("run", _kernel_errors, kernel, inputs, references)
        if isinstance(errors, str):
            slot.add(source, CandidateStatus.FAILED, errors, scope=scope)
            continue
        error = max(errors)
        if error > settings.attention_tolerance:
            slot.add(
                source,
                CandidateStatus.REJECTED,
                f"relative error {error:.2e} exceeds {settings.attention_tolerance:.0e}",
                scope=scope,
                numeric_error=error,
            )
            continue
        elapsed = (
            sum(median_ms(partial(kernel, *qkv), settings.repeats, model.info.device) for qkv in inputs)
            if model.measure
            else None
        )
        passing.append((candidate, error, elapsed))
    if not passing:
        return None
    winner_source, reasons = pick_fastest([(c[0], t) for c, _, t in passing], settings.tie_fraction)
    for index, (candidate, error, elapsed) in enumerate(passing):
        won = candidate[0] is winner_source
        status = (
            CandidateStatus.CHOSEN
            if won
            else (CandidateStatus.SLOWER if model.measure else CandidateStatus.AVAILABLE)
        )
        slot.add(
            candidate[0],
            status,
            "" if won else reasons[index],
            scope=scope,
            numeric_error=error,
            time_ms=elapsed,
        )
    return next(c for c, _, _ in passing if c[0] is winner_source)


def _kernel_errors(
    kernel: AttentionFn, inputs: list[tuple[torch.Tensor, ...]], references: list[torch.Tensor]
) -> list[float]:
    return [relative_error(kernel(*qkv), ref) for qkv, ref in zip(inputs, references, strict=True)]


def _supports(offer: AttentionOffer, shape: AttentionShape) -> Availability:
    answer = guard("supports", offer.supports, shape)
    return Availability.no(answer) if isinstance(answer, str) else answer


def _qkv(
    shape: AttentionShape, batch: int, info: ModelInfo
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)

    def rand(length: int) -> torch.Tensor:
        return torch.randn(batch, shape.heads, length, shape.head_dim, generator=generator).to(
            info.device, info.dtype
        )

    return rand(shape.query_len), rand(shape.key_len), rand(shape.key_len)
