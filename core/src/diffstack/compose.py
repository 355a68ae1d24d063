"""Composition: for each slot, collect every offer, probe it, check its numbers, time it, choose.

Every decision lands in one immutable :class:`~diffstack.types.StackReport`. Nothing a plugin does
here can stop composition: a probe, build or run that raises marks that offer ``failed`` and the
slot falls back to the others (and, for attention, to SDPA).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

import structlog
import torch

from diffstack.config import ComposeSettings
from diffstack.engine.attention import backend_kernel, install_attention, sdpa
from diffstack.plugins import OfferFrom, PluginHost
from diffstack.timing import median_ms, relative_error
from diffstack.types import (
    AttentionFn,
    AttentionOffer,
    AttentionShape,
    Availability,
    CandidateReport,
    CandidateStatus,
    CompileOffer,
    DenoiserKind,
    DenoiserWrapperOffer,
    EncoderOffer,
    ModelInfo,
    Offer,
    PromptEmbeddings,
    PromptEncoder,
    PromptSpec,
    SigmasOffer,
    SlotReport,
)

log = structlog.get_logger(__name__)
OfferT = TypeVar("OfferT", bound=Offer)
ResultT = TypeVar("ResultT")


@dataclass
class ModelUnderTest:
    """What composition needs of the loaded model: its facts and a way to call its denoiser."""

    info: ModelInfo
    denoiser: torch.nn.Module
    denoiser_inputs: dict[str, Any]
    reference_output: torch.Tensor
    module_shapes: dict[str, AttentionShape]
    base_encoder: PromptEncoder
    scheduler: Any
    measure: bool


@dataclass
class ComposedStack:
    """The decisions, ready for the engine to apply, and the report that explains them."""

    slots: list[SlotReport] = field(default_factory=list)
    attention_plan: dict[str, tuple[str, AttentionFn]] = field(default_factory=dict)
    attention_backend: str | None = None
    compiled: torch.nn.Module | None = None
    compiled_name: str = ""
    schedules: dict[str, SigmasOffer] = field(default_factory=dict)
    custom_schedules: set[str] = field(default_factory=set)
    """Schedules that pass their own sigmas (so they need a sampler that takes ``sigmas=``)."""
    auto_schedule: str = ""
    encoder: PromptEncoder | None = None
    encoder_chain: list[Any] = field(default_factory=list)
    wrappers: dict[str, DenoiserWrapperOffer] = field(default_factory=dict)


class _Slot:
    """Collects one slot's candidate reports while it is decided."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.candidates: list[CandidateReport] = []
        self.chosen: list[str] = []

    def add(
        self, source: OfferFrom | None, status: CandidateStatus, reason: str = "", **numbers: Any
    ) -> None:
        offer = source.offer if source else None
        self.candidates.append(
            CandidateReport(
                plugin=source.plugin if source else "",
                offer=offer.name if offer else "",
                priority=offer.priority if offer else 0,
                status=status,
                reason=reason,
                **numbers,
            )
        )

    def report(self) -> SlotReport:
        return SlotReport(self.name, tuple(self.chosen), tuple(self.candidates))


def _valid_offers(
    host: PluginHost, hook: str, offer_type: type[OfferT], model: ModelUnderTest, slot: _Slot
) -> list[tuple[OfferFrom, OfferT]]:
    """Offers of the right type whose probe says yes; everything else is recorded in ``slot``."""
    sources, failures = host.collect(hook, model=model.info)
    for failure in failures:
        slot.candidates.append(
            CandidateReport(failure.plugin, "", 0, CandidateStatus.FAILED, f"hook raised: {failure.error}")
        )
    valid: list[tuple[OfferFrom, OfferT]] = []
    for source in sources:
        if not isinstance(source.offer, offer_type):
            slot.add(
                source,
                CandidateStatus.FAILED,
                f"returned {type(source.offer).__name__}, expected {offer_type.__name__}",
            )
            continue
        availability = _guard("probe", source.offer.probe, model.info)
        if isinstance(availability, str):
            slot.add(source, CandidateStatus.FAILED, availability)
        elif not availability.ok:
            slot.add(source, CandidateStatus.REJECTED, availability.reason)
        else:
            valid.append((source, source.offer))
    return sorted(valid, key=lambda pair: -pair[1].priority)


def _guard(stage: str, fn: Callable[..., ResultT], *args: Any) -> ResultT | str:
    """Run a plugin's code; an exception becomes a reason string instead of escaping."""
    try:
        return fn(*args)
    except Exception as exc:
        return f"{stage} raised {type(exc).__name__}: {exc}"


def _pick_fastest(
    timed: list[tuple[OfferFrom, float | None]], tie_fraction: float
) -> tuple[OfferFrom, dict[int, str]]:
    """The fastest offer, priority breaking ties within ``tie_fraction``; reasons for the rest."""
    measured = [t for _, t in timed if t is not None]
    if not measured:
        return timed[0][0], {i: "lower priority (timing skipped)" for i in range(1, len(timed))}
    fastest = min(measured)
    tied = [i for i, (_, t) in enumerate(timed) if t is not None and t <= fastest * (1 + tie_fraction)]
    winner = tied[0]  # ``timed`` is in priority order
    reasons = {
        i: f"{t / fastest:.2f}x the fastest" if t is not None and i not in tied else "tied, lower priority"
        for i, (_, t) in enumerate(timed)
        if i != winner
    }
    return timed[winner][0], reasons


# -------------------------------------------------------------------------------------------------
# select_attention
# -------------------------------------------------------------------------------------------------


def compose_attention(
    host: PluginHost, model: ModelUnderTest, settings: ComposeSettings, stack: ComposedStack
) -> None:
    slot = _Slot("select_attention")
    built: list[tuple[OfferFrom, AttentionOffer, AttentionFn]] = []
    transformer = model.info.denoiser_kind is DenoiserKind.TRANSFORMER
    for source, offer in _valid_offers(host, "select_attention", AttentionOffer, model, slot):
        if transformer and offer.diffusers_backend is None:
            slot.add(
                source,
                CandidateStatus.REJECTED,
                "offers no diffusers attention backend for transformer models",
            )
            continue
        kernel = (
            _guard("build", backend_kernel, offer.diffusers_backend)
            if transformer and offer.diffusers_backend
            else _guard("build", offer.build, model.info)
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
    slot: _Slot,
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
        errors = _guard("run", _kernel_errors, kernel, inputs, references)
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
    winner_source, reasons = _pick_fastest([(c[0], t) for c, _, t in passing], settings.tie_fraction)
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
    answer = _guard("supports", offer.supports, shape)
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


# -------------------------------------------------------------------------------------------------
# compile_model
# -------------------------------------------------------------------------------------------------


def compose_compile(
    host: PluginHost, model: ModelUnderTest, settings: ComposeSettings, stack: ComposedStack
) -> None:
    slot = _Slot("compile_model")
    passing: list[tuple[OfferFrom, torch.nn.Module, float, float, float | None]] = []
    for source, offer in _valid_offers(host, "compile_model", CompileOffer, model, slot):
        started = time.perf_counter()
        result = _guard("build", _build_and_run, offer, model)
        setup_s = time.perf_counter() - started
        if isinstance(result, str):
            slot.add(source, CandidateStatus.FAILED, result, setup_s=setup_s)
            continue
        module, output = result
        error = relative_error(output, model.reference_output)
        if error > settings.compile_tolerance:
            slot.add(
                source,
                CandidateStatus.REJECTED,
                f"relative error {error:.2e} vs eager exceeds {settings.compile_tolerance:.0e}",
                numeric_error=error,
                setup_s=setup_s,
            )
            continue
        elapsed = (
            median_ms(
                partial(module, **model.denoiser_inputs, return_dict=False),
                settings.repeats,
                model.info.device,
            )
            if model.measure
            else None
        )
        passing.append((source, module, error, setup_s, elapsed))
    if passing:
        winner, reasons = _pick_fastest([(p[0], p[4]) for p in passing], settings.tie_fraction)
        for index, (source, module, error, setup_s, elapsed) in enumerate(passing):
            won = source is winner
            status = (
                CandidateStatus.CHOSEN
                if won
                else (CandidateStatus.SLOWER if model.measure else CandidateStatus.AVAILABLE)
            )
            slot.add(
                source,
                status,
                "" if won else reasons[index],
                numeric_error=error,
                time_ms=elapsed,
                setup_s=setup_s,
            )
            if won:
                stack.compiled, stack.compiled_name = module, source.offer.name
                slot.chosen.append(source.offer.name)
    stack.slots.append(slot.report())


def _build_and_run(offer: CompileOffer, model: ModelUnderTest) -> tuple[torch.nn.Module, torch.Tensor]:
    module = offer.build(model.denoiser, model.info)
    with torch.inference_mode():
        output = module(**model.denoiser_inputs, return_dict=False)[0]
    return module, output


# -------------------------------------------------------------------------------------------------
# build_sigmas
# -------------------------------------------------------------------------------------------------


def compose_sigmas(host: PluginHost, model: ModelUnderTest, stack: ComposedStack) -> None:
    slot = _Slot("build_sigmas")
    for source, offer in _valid_offers(host, "build_sigmas", SigmasOffer, model, slot):
        if model.info.family not in offer.families:
            slot.add(source, CandidateStatus.REJECTED, f"not made for {model.info.family.value} models")
            continue
        if offer.name in stack.schedules:
            slot.add(
                source,
                CandidateStatus.REJECTED,
                f"another plugin already offers a schedule named {offer.name!r}",
            )
            continue
        sigmas = _guard("build", offer.build, SIGMAS_CHECK_STEPS, model.scheduler)
        if isinstance(sigmas, str):
            slot.add(source, CandidateStatus.FAILED, sigmas)
            continue
        problem = _check_sigmas(sigmas)
        if problem:
            slot.add(source, CandidateStatus.REJECTED, problem)
            continue
        stack.schedules[offer.name] = offer
        if sigmas is not None:
            stack.custom_schedules.add(offer.name)
        if not stack.auto_schedule:
            stack.auto_schedule = offer.name
            slot.chosen.append(offer.name)
            slot.add(source, CandidateStatus.CHOSEN, "the schedule `auto` takes (highest priority)")
        else:
            slot.add(source, CandidateStatus.AVAILABLE, "named by requests")
    stack.slots.append(slot.report())


SIGMAS_CHECK_STEPS = 10


def _check_sigmas(sigmas: list[float] | None, steps: int = SIGMAS_CHECK_STEPS) -> str:
    """What is wrong with a schedule's sigmas, or "" (None means the scheduler's own: fine)."""
    if sigmas is None:
        return ""
    values = torch.tensor(sigmas, dtype=torch.float64)
    if len(values) != steps + 1:
        return f"gave {len(values)} sigmas for {steps} steps, expected {steps + 1}"
    if values[-1] != 0 or not bool((values[:-1] > values[1:]).all()):
        return "sigmas must descend strictly and end in 0"
    return ""


# -------------------------------------------------------------------------------------------------
# encode_prompt
# -------------------------------------------------------------------------------------------------

CHECK_PROMPT = PromptSpec("a red circle at the top left", "blurry")


def _encode_twice(encoder: PromptEncoder) -> list[PromptEmbeddings]:
    """Twice, so a cache is checked on its hit as well as its miss."""
    return [encoder(CHECK_PROMPT) for _ in range(2)]


def compose_encoder(host: PluginHost, model: ModelUnderTest, stack: ComposedStack) -> None:
    slot = _Slot("encode_prompt")
    reference = model.base_encoder(CHECK_PROMPT)
    encoder = model.base_encoder
    for source, offer in reversed(_valid_offers(host, "encode_prompt", EncoderOffer, model, slot)):
        wrapped = _guard("wrap", offer.wrap, encoder, model.info)
        if isinstance(wrapped, str):
            slot.add(source, CandidateStatus.FAILED, wrapped)
            continue
        outputs = _guard("encode", _encode_twice, wrapped)
        if isinstance(outputs, str):
            slot.add(source, CandidateStatus.FAILED, outputs)
            continue
        error = max(relative_error(out[k], reference[k]) for out in outputs for k in reference)
        if error > 0:
            slot.add(
                source,
                CandidateStatus.REJECTED,
                f"embeddings differ from the pipeline's own (relative error {error:.2e})",
                numeric_error=error,
            )
            continue
        encoder = wrapped
        stack.encoder_chain.append(wrapped)
        slot.chosen.insert(0, offer.name)
        slot.add(source, CandidateStatus.CHOSEN, "wraps the pipeline's encoder", numeric_error=error)
    stack.encoder = encoder
    stack.slots.append(slot.report())


# -------------------------------------------------------------------------------------------------
# wrap_denoiser
# -------------------------------------------------------------------------------------------------


def compose_wrappers(host: PluginHost, model: ModelUnderTest, stack: ComposedStack) -> None:
    slot = _Slot("wrap_denoiser")
    for source, offer in _valid_offers(host, "wrap_denoiser", DenoiserWrapperOffer, model, slot):
        if model.info.denoiser_kind not in offer.denoiser_kinds:
            slot.add(
                source,
                CandidateStatus.REJECTED,
                f"needs a {' or '.join(sorted(offer.denoiser_kinds))} denoiser, "
                f"this model has a {model.info.denoiser_kind}",
            )
            continue
        problem = _guard("apply", _check_wrapper, offer, model)
        if problem:
            slot.add(
                source, CandidateStatus.FAILED if "raised" in problem else CandidateStatus.REJECTED, problem
            )
            continue
        stack.wrappers[offer.name] = offer
        slot.add(source, CandidateStatus.AVAILABLE, "enabled per request")
    stack.slots.append(slot.report())


def _check_wrapper(offer: DenoiserWrapperOffer, model: ModelUnderTest) -> str:
    """The wrapper must run, and removing it must leave the denoiser exactly as it was."""
    handle = offer.apply(model.denoiser, model.info.plugin_options(offer.name))
    try:
        handle.reset_state()
        with torch.inference_mode():
            output = model.denoiser(**model.denoiser_inputs, return_dict=False)[0]
        if not torch.isfinite(output).all():
            return "produced non-finite output"
    finally:
        handle.remove()
    with torch.inference_mode():
        after = model.denoiser(**model.denoiser_inputs, return_dict=False)[0]
    return "" if torch.equal(after, model.reference_output) else "removing it did not restore the denoiser"


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
