"""select_attention: per attention shape, probe → relative error vs float32 SDPA → fastest.

Every kernel that passed for a shape stays behind the winner, fastest first, as that shape's run-time
fallback chain (then SDPA): the report's notes show each chain.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from types import MappingProxyType

import torch

from diffstack.attention import ChainLink, KernelChain, backend_kernel, sdpa
from diffstack.compose.slots import (
    ModelUnderTest,
    SlotRecorder,
    Trial,
    build_guard,
    checked_availability,
    probe_guard,
    settle,
    valid_offers,
)
from diffstack.config import ComposeSettings
from diffstack.plugins import Failure, PluginHost
from diffstack.timing import median_ms, relative_error
from diffstack.types import (
    AttentionFn,
    AttentionOffer,
    AttentionShape,
    Availability,
    CandidateStatus,
    DenoiserKind,
    ModelInfo,
    SlotReport,
)

AttentionTrial = Trial[AttentionOffer, AttentionFn]


@dataclass(frozen=True)
class AttentionDecision:
    """The kernels chosen: per attention module (UNets) or one dispatch backend (transformers)."""

    plan: Mapping[str, tuple[str, AttentionFn]]
    """Attention module name → (the report's entry for it, kernel); modules absent keep SDPA."""
    backend: str | None
    report: SlotReport
    notes: tuple[str, ...] = ()
    """One line per scope whose kernel has a fallback: the order kernels are tried in at run time."""


def compose_attention(
    host: PluginHost, model: ModelUnderTest, settings: ComposeSettings
) -> AttentionDecision:
    slot = SlotRecorder("select_attention")
    transformer = model.info.denoiser_kind is DenoiserKind.TRANSFORMER
    built: list[AttentionTrial] = []
    for trial in valid_offers(host, "select_attention", AttentionOffer, model, settings, slot):
        backend = trial.offer.diffusers_backend
        if transformer and backend is None:
            slot.record(
                trial,
                CandidateStatus.REJECTED,
                "offers no diffusers attention backend for transformer models",
            )
            continue
        build = (
            partial(backend_kernel, backend)
            if backend and transformer
            else partial(trial.offer.build, model.info)
        )
        kernel = build_guard(settings, "build", build)
        if isinstance(kernel, Failure):
            slot.fail(trial, kernel)
        else:
            built.append(trial.with_build(kernel))

    distinct = sorted(set(model.module_shapes.values()), key=lambda s: s.key)
    scopes = [(f"all {len(distinct)} shapes", distinct)] if transformer else [(s.key, [s]) for s in distinct]
    chosen: list[str] = []
    plan: dict[str, tuple[str, AttentionFn]] = {}
    notes: list[str] = []
    backend_chosen: str | None = None
    for scope, shapes in scopes:
        ranked = _decide(slot, scope, shapes, built, model, settings)
        if not ranked:
            continue
        winner = ranked[0]
        chosen.append(winner.offer.name if transformer else f"{scope}: {winner.offer.name}")
        if transformer:
            backend_chosen = winner.offer.diffusers_backend
            continue
        chain = KernelChain([ChainLink(t.offer.name, t.value(), t.offer.supports) for t in ranked])
        if chain.order != "sdpa":
            notes.append(f"attention fallback order, {scope}: {chain.order}")
        plan.update(
            (module, (chosen[-1], chain))  # labelled as the report names the choice
            for module, shape in model.module_shapes.items()
            if shape in shapes
        )
    return AttentionDecision(MappingProxyType(plan), backend_chosen, slot.report(chosen), tuple(notes))


def _decide(
    slot: SlotRecorder,
    scope: str,
    shapes: Sequence[AttentionShape],
    built: list[AttentionTrial],
    model: ModelUnderTest,
    settings: ComposeSettings,
) -> list[AttentionTrial]:
    """One scope's trials that passed, the winner first, then the rest fastest first (the fallback
    order): each must support every shape, match SDPA, and is then timed."""
    inputs = [_qkv(shape, settings.batch, model.info) for shape in shapes]
    references = [sdpa(*(t.float() for t in qkv)) for qkv in inputs]
    passing: list[AttentionTrial] = []
    for trial in built:
        unsupported = _first_unsupported(trial.offer, shapes, settings)
        if isinstance(unsupported, Failure):
            slot.fail(trial, unsupported, scope)
            continue
        if unsupported is not None:
            slot.record(trial, CandidateStatus.REJECTED, unsupported.reason, scope)
            continue
        errors = build_guard(settings, "run", _kernel_errors, trial.value(), inputs, references)
        if isinstance(errors, Failure):
            slot.fail(trial, errors, scope)
            continue
        checked = replace(trial, numeric_error=max(errors))
        if max(errors) > settings.attention_tolerance:
            reason = f"relative error {max(errors):.2e} exceeds {settings.attention_tolerance:.0e}"
            slot.record(checked, CandidateStatus.REJECTED, reason, scope)
            continue
        if model.measure:
            kernel = trial.value()
            elapsed = sum(
                median_ms(partial(kernel, *qkv), settings.repeats, model.info.device) for qkv in inputs
            )
            checked = replace(checked, time_ms=elapsed)
        passing.append(checked)
    winner = settle(slot, passing, measured=model.measure, tie_fraction=settings.tie_fraction, scope=scope)
    rest = sorted(
        (t for t in passing if t is not winner),
        key=lambda t: (t.time_ms if t.time_ms is not None else float("inf"), t.rank),
    )
    return [] if winner is None else [winner, *rest]


def _kernel_errors(
    kernel: AttentionFn, inputs: list[tuple[torch.Tensor, ...]], references: list[torch.Tensor]
) -> list[float]:
    return [relative_error(kernel(*qkv), ref) for qkv, ref in zip(inputs, references, strict=True)]


def _first_unsupported(
    offer: AttentionOffer, shapes: Sequence[AttentionShape], settings: ComposeSettings
) -> Availability | Failure | None:
    """The offer's "no" for the first shape it does not serve, a failure, or None when it serves all."""
    for shape in shapes:
        answer = probe_guard(
            settings, "supports", lambda s: checked_availability(offer.supports(s), "supports"), shape
        )
        if isinstance(answer, Failure) or not answer.ok:
            return answer
    return None


def _qkv(
    shape: AttentionShape, batch: int, info: ModelInfo
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)

    def rand(length: int) -> torch.Tensor:
        return torch.randn(batch, shape.heads, length, shape.head_dim, generator=generator).to(
            info.device, info.dtype
        )

    return rand(shape.query_len), rand(shape.key_len), rand(shape.key_len)
