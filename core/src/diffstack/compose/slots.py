"""What every slot's decision shares: the model under test, the candidate under trial, the slot's
record, and ``settle``, the one fastest-within-tolerance rule."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Generic, TypeVar

import structlog
import torch

from diffstack.config import ComposeSettings
from diffstack.plugins import Failure, HookFailure, OfferFrom, PluginHost, guard
from diffstack.types import (
    AttentionShape,
    Availability,
    Built,
    CandidateReport,
    CandidateStatus,
    ModelInfo,
    Offer,
    PromptEncoder,
    SlotReport,
)

log = structlog.get_logger(__name__)
OfferT = TypeVar("OfferT", bound=Offer)
BuiltT = TypeVar("BuiltT")
ResultT = TypeVar("ResultT")


@dataclass(frozen=True)
class ModelUnderTest:
    """What composition needs of the loaded model: its facts and a way to call its denoiser."""

    info: ModelInfo
    denoiser: torch.nn.Module
    denoiser_inputs: dict[str, Any]
    module_shapes: dict[str, AttentionShape]
    base_encoder: PromptEncoder
    scheduler: Any
    measure: bool
    builtin_samplers: frozenset[str] = frozenset()
    """The engine's own sampler names, which a plugin's sampler may not take."""
    vae: torch.nn.Module | None = None
    """The pipeline's VAE, for the VAE-decode compile slot (None: that slot is not decided)."""
    vae_latents: torch.Tensor | None = None
    """One image's latents (at the default size when offers are timed), in the VAE's dtype: the
    decode check's input."""

    def denoise(self, denoiser: Callable[..., Any] | None = None) -> torch.Tensor:
        """One call of ``denoiser`` (the model's own by default) on the measured inputs, under
        ``no_grad`` as diffusers' pipelines call it: Dynamo guards on inference mode, so a compiled
        denoiser checked under ``inference_mode`` compiled its graph a second time on its first
        pipeline call (12.6 s of an H200's restart, for the SD1.5 UNet)."""
        with torch.no_grad():
            module = self.denoiser if denoiser is None else denoiser  # modules may refuse bool()/len()
            return module(**self.denoiser_inputs, return_dict=False)[0]


@dataclass(frozen=True, eq=False)
class Trial(Generic[OfferT, BuiltT]):
    """One offer under trial in one slot (and scope): who offered it, what its build gave, how it
    fared. Each stage returns a new Trial; the slot's record turns it into a CandidateReport."""

    plugin: str
    offer: OfferT
    built: BuiltT | None = None
    failure: Failure | None = None
    numeric_error: float | None = None
    time_ms: float | None = None
    setup_s: float | None = None
    notes: tuple[str, ...] = ()

    @property
    def rank(self) -> tuple[int, str, str]:
        """The order that breaks ties: higher priority first, then plugin and offer name (never
        the order plugins were installed or called in)."""
        return (-self.offer.priority, self.plugin, self.offer.name)

    def with_build(self, result: BuiltT | Built[BuiltT]) -> Trial[OfferT, BuiltT]:
        """This trial with a build's result in place, its :class:`Built` notes appended."""
        if isinstance(result, Built):
            return replace(self, built=result.value, notes=(*self.notes, *result.notes))
        return replace(self, built=result)

    def value(self) -> BuiltT:
        """The built object of a trial that has one."""
        if self.built is None:
            raise ValueError(f"offer {self.offer.name!r} has not been built")
        return self.built


class SlotRecorder:
    """Collects one slot's candidate reports while it is decided."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.candidates: list[CandidateReport] = []

    def record(
        self, trial: Trial[Any, Any], status: CandidateStatus, reason: str = "", scope: str = ""
    ) -> None:
        candidate = CandidateReport(
            plugin=trial.plugin,
            offer=trial.offer.name,
            priority=trial.offer.priority,
            status=status,
            reason=reason,
            scope=scope,
            numeric_error=trial.numeric_error,
            time_ms=trial.time_ms,
            setup_s=trial.setup_s,
            notes=trial.notes,
        )
        self.candidates.append(candidate)
        log.info(
            "candidate",
            slot=self.name,
            plugin=candidate.plugin,
            offer=candidate.offer,
            scope=scope or None,
            status=status.value,
            reason=reason or None,
            notes=list(candidate.notes) or None,
        )

    def fail(self, trial: Trial[Any, Any], failure: Failure, scope: str = "") -> None:
        self.record(replace(trial, failure=failure), failure.status, failure.reason, scope)

    def hook_failed(self, failure: HookFailure) -> None:
        """A plugin whose hook gave no usable offers: one candidate without an offer name."""
        self.candidates.append(
            CandidateReport(failure.plugin, "", 0, failure.failure.status, failure.failure.reason)
        )
        log.warning("plugin hook failed", slot=self.name, plugin=failure.plugin, error=failure.error)

    def report(self, chosen: Sequence[str]) -> SlotReport:
        return SlotReport(self.name, tuple(chosen), tuple(self.candidates))


def valid_offers(
    host: PluginHost,
    hook: str,
    offer_type: type[OfferT],
    model: ModelUnderTest,
    settings: ComposeSettings,
    slot: SlotRecorder,
    where: Callable[[Any], bool] | None = None,
) -> list[Trial[OfferT, Any]]:
    """Trials of the offers whose probe says yes, best rank first; everything else is recorded.

    ``where`` keeps only the offers this slot decides (a hook that feeds two slots, such as
    ``compile_model``'s denoiser and VAE-decode targets)."""
    sources, failures = host.collect(hook, model=model.info)
    for failure in failures:
        slot.hook_failed(failure)
    if where is not None:
        sources = [source for source in sources if where(source.offer)]
    valid: list[Trial[OfferT, Any]] = []
    for source in _unique_names(host, sources, slot):
        trial: Trial[OfferT, Any] = Trial(source.plugin, source.offer)  # type: ignore[arg-type]
        log.info("probing offer", slot=slot.name, plugin=source.plugin, offer=source.offer.name)
        answer = probe_guard(settings, "probe", _probe, source.offer, model.info)
        if isinstance(answer, Failure):
            slot.fail(trial, answer)
        elif not answer.ok:
            slot.record(trial, CandidateStatus.REJECTED, answer.reason)
        else:
            valid.append(replace(trial, notes=(answer.reason,)) if answer.reason else trial)
    return sorted(valid, key=lambda t: t.rank)


def build_guard(
    settings: ComposeSettings, stage: str, fn: Callable[..., ResultT], *args: Any
) -> ResultT | Failure:
    """Plugin code that builds or checks an offer, bounded by ``compose.build_timeout_s``."""
    return guard(stage, fn, *args, limit_s=settings.build_timeout_s, limit_name="compose.build_timeout_s")


def probe_guard(
    settings: ComposeSettings, stage: str, fn: Callable[..., ResultT], *args: Any
) -> ResultT | Failure:
    """A plugin's quick yes/no question, bounded by ``compose.probe_timeout_s``."""
    return guard(stage, fn, *args, limit_s=settings.probe_timeout_s, limit_name="compose.probe_timeout_s")


def _probe(offer: Offer, info: ModelInfo) -> Availability:
    return checked_availability(offer.probe(info), "probe")


def checked_availability(answer: object, stage: str) -> Availability:
    """A plugin's yes/no answer, or a TypeError naming what it returned instead."""
    if not isinstance(answer, Availability):
        raise TypeError(f"{stage} returned {type(answer).__name__}, expected Availability")
    return answer


def _unique_names(host: PluginHost, sources: list[OfferFrom], slot: SlotRecorder) -> list[OfferFrom]:
    """One offer per name in a slot: a built-in keeps its names, then the best rank keeps a name."""
    ordered = sorted(
        sources,
        key=lambda s: (not host.is_builtin(s.plugin), -s.offer.priority, s.plugin, s.offer.name),
    )
    holders: dict[str, OfferFrom] = {}
    for source in ordered:
        holder = holders.setdefault(source.offer.name, source)
        if holder is not source:
            owner = (
                f"built-in plugin {holder.plugin!r}"
                if host.is_builtin(holder.plugin)
                else repr(holder.plugin)
            )
            slot.record(
                Trial(source.plugin, source.offer),
                CandidateStatus.REJECTED,
                f"the name {source.offer.name!r} is already offered in this slot by {owner}; "
                "offers in one slot need distinct names",
            )
    return list(holders.values())


def settle(
    slot: SlotRecorder,
    passing: Sequence[Trial[OfferT, BuiltT]],
    *,
    measured: bool,
    tie_fraction: float,
    scope: str = "",
) -> Trial[OfferT, BuiltT] | None:
    """Choose among trials that passed every check, and record every one's fate.

    Measured: the fastest wins, and trials within ``tie_fraction`` of it count as tied, the best
    rank (−priority, plugin, name) among them winning. Unmeasured: the best rank wins. Returns the
    winner as given (one of ``passing``), whatever times the ranks of a parallel group agreed on.
    """
    agreed = _agreed_times(passing)
    winner = _choose(slot, agreed, measured=measured, tie_fraction=tie_fraction, scope=scope)
    return None if winner is None else passing[agreed.index(winner)]


def _choose(
    slot: SlotRecorder,
    passing: Sequence[Trial[OfferT, BuiltT]],
    *,
    measured: bool,
    tie_fraction: float,
    scope: str,
) -> Trial[OfferT, BuiltT] | None:
    if not passing:
        return None
    ordered = sorted(passing, key=lambda t: t.rank)
    times = [t.time_ms for t in ordered if t.time_ms is not None]
    fastest = min(times) if measured and times else None
    tied = [
        t
        for t in ordered
        if fastest is None or (t.time_ms is not None and t.time_ms <= fastest * (1 + tie_fraction))
    ]
    winner = tied[0]
    for trial in ordered:
        if trial is winner:
            slot.record(trial, CandidateStatus.CHOSEN, scope=scope)
        elif fastest is None:
            slot.record(
                trial, CandidateStatus.AVAILABLE, f"{_ranked_below(trial, winner)} (timing skipped)", scope
            )
        elif any(trial is t for t in tied):
            slot.record(trial, CandidateStatus.SLOWER, f"tied, {_ranked_below(trial, winner)}", scope)
        else:
            ratio = (
                f"{trial.time_ms / fastest:.2f}x the fastest" if trial.time_ms is not None else "not timed"
            )
            slot.record(trial, CandidateStatus.SLOWER, ratio, scope)
    return winner


def agreed_across_ranks(values: Mapping[str, float | None]) -> dict[str, float | None]:
    """Each name's largest value over the ranks of a torch.distributed group (a name some rank lacks,
    or measured as None there, gets infinity); ``values`` itself in a single process.

    Under context parallelism every rank composes its own copy of the stack, and the parallel
    offers' calls are collectives: the ranks must reject, keep and choose exactly the same offers,
    or one rank would wait for the others forever. So whatever a decision compares (numeric errors,
    times) is agreed first, the same way on every rank. Every rank must call this equally often.
    """
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() < 2:
        return dict(values)
    gathered: list[Mapping[str, float | None] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, dict(values))
    agreed: dict[str, float | None] = {}
    for name in values:
        seen = [rank.get(name) for rank in gathered if rank is not None]
        known = [v for v in seen if v is not None]
        missing = len(known) < len(gathered)
        agreed[name] = (
            float("inf") if missing and values[name] is not None else (max(known) if known else None)
        )
    return agreed


def _agreed_times(passing: Sequence[Trial[OfferT, BuiltT]]) -> list[Trial[OfferT, BuiltT]]:
    """``passing`` with the times every rank agreed on (the very same trials in one process)."""
    times = agreed_across_ranks({t.offer.name: t.time_ms for t in passing})
    return [
        t if times[t.offer.name] == t.time_ms else replace(t, time_ms=times[t.offer.name]) for t in passing
    ]


def _ranked_below(trial: Trial[Any, Any], winner: Trial[Any, Any]) -> str:
    if trial.offer.priority < winner.offer.priority:
        return "lower priority"
    return f"same priority, ranked after {winner.plugin}/{winner.offer.name} by name"
