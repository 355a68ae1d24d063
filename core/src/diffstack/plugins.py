"""The plugin host: discovery through entry points, allow/deny lists, and fault-isolated hook calls.

pluggy's ``firstresult`` would hide the losers and one raising implementation would abort the whole
call, so the host calls each plugin's implementation on its own and keeps every offer tied to the
plugin that made it. A plugin that fails to import, validate or answer, answers with something that
is not a list of offers, or takes longer than its limit is recorded and skipped, never fatal.
"""

from __future__ import annotations

import contextvars
import importlib.metadata as metadata
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, TypeVar

import pluggy
import structlog

from diffstack import hookspecs
from diffstack.config import PluginSettings
from diffstack.types import (
    AnyOffer,
    AttentionOffer,
    CandidateStatus,
    CompileOffer,
    DenoiserWrapperOffer,
    EncoderOffer,
    Offer,
    PluginRecord,
    PluginStatus,
    SamplerOffer,
    SigmasOffer,
)

log = structlog.get_logger(__name__)
ResultT = TypeVar("ResultT")

OFFER_TYPES: dict[str, type[Offer]] = {
    "select_attention": AttentionOffer,
    "build_sigmas": SigmasOffer,
    "select_sampler": SamplerOffer,
    "encode_prompt": EncoderOffer,
    "wrap_denoiser": DenoiserWrapperOffer,
    "compile_model": CompileOffer,
}
"""The offer type each hook must return."""

BUILTIN_PLUGINS = {
    "sdpa": "diffstack-sdpa",
    "schedules": "diffstack-schedules",
    "plain_encoder": "diffstack-plain-encoder",
    "eager": "diffstack-eager",
}
"""The baselines that ship with diffstack (plugin name → distribution). They load first, and their
offer names are theirs: a third-party offer of the same name in the same slot is refused."""


@dataclass(frozen=True)
class Failure:
    """Plugin code that raised or ran past its limit: a value recorded in the report, never raised."""

    reason: str
    timed_out: bool = False

    @property
    def status(self) -> CandidateStatus:
        return CandidateStatus.TIMED_OUT if self.timed_out else CandidateStatus.FAILED


def guard(
    stage: str, fn: Callable[..., ResultT], *args: Any, limit_s: float | None = None, limit_name: str = ""
) -> ResultT | Failure:
    """Run a plugin's code; an exception, or running past ``limit_s`` seconds, becomes a Failure.

    With a limit the code runs on a daemon thread that is abandoned when it overruns (Python cannot
    stop a thread; a daemon never keeps the process alive). ``limit_name`` is the setting to raise.
    """
    if limit_s is None:
        try:
            return fn(*args)
        except Exception as exc:
            return Failure(f"{stage} raised {type(exc).__name__}: {exc}")
    results: list[ResultT] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(fn(*args))
        except BaseException as exc:  # a plugin calling sys.exit must not end the server either
            errors.append(exc)

    context = contextvars.copy_context()  # the caller's bound log context (model, request) goes along
    worker = threading.Thread(target=context.run, args=(run,), name=f"diffstack-plugin-{stage}", daemon=True)
    worker.start()
    worker.join(limit_s)
    if results:
        return results[0]
    if errors:
        return Failure(f"{stage} raised {type(errors[0]).__name__}: {errors[0]}")
    setting = f" ({limit_name})" if limit_name else ""
    return Failure(f"{stage} timed out after {limit_s:g} s{setting}", timed_out=True)


@dataclass(frozen=True)
class OfferFrom:
    """An offer and the plugin that made it."""

    plugin: str
    offer: AnyOffer


@dataclass(frozen=True)
class HookFailure:
    """A plugin whose hook raised, overran or answered with something that is not a list of offers."""

    plugin: str
    failure: Failure

    @property
    def error(self) -> str:
        return self.failure.reason


class PluginHost:
    """Owns the pluggy manager and the record of every plugin seen, loaded or not."""

    def __init__(self, settings: PluginSettings | None = None) -> None:
        self.manager = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self.manager.add_hookspecs(hookspecs)
        self.settings = settings or PluginSettings()
        self._records: dict[str, PluginRecord] = {}

    @property
    def records(self) -> tuple[PluginRecord, ...]:
        """Every plugin seen, sorted by name: the data behind ``diffstack plugins`` and ListPlugins."""
        return tuple(sorted(self._records.values(), key=lambda r: r.name))

    def is_builtin(self, plugin: str) -> bool:
        """Whether ``plugin`` is one of diffstack's own baselines (by name and distribution)."""
        record = self._records.get(plugin)
        return record is not None and BUILTIN_PLUGINS.get(plugin) == record.distribution

    def load_entry_points(self, entry_points: Iterable[metadata.EntryPoint] | None = None) -> None:
        """Load the plugins of the ``diffstack`` group that the allow/deny lists admit.

        Built-ins first, then by name: which plugin keeps a contested name never depends on the
        order in which distributions were installed.
        """
        if entry_points is None:
            entry_points = metadata.entry_points(group=hookspecs.PROJECT_NAME)
        for entry_point in sorted(entry_points, key=_load_order):
            self._load_entry_point(entry_point)

    def _load_entry_point(self, entry_point: metadata.EntryPoint) -> None:
        dist = entry_point.dist
        record = PluginRecord(
            name=entry_point.name,
            distribution=dist.name if dist else "",
            version=dist.version if dist else "",
            entry_point=entry_point.value,
            hooks=(),
            status=PluginStatus.DISABLED,
        )
        settings = self.settings
        if entry_point.name in settings.deny or (
            settings.allow is not None and entry_point.name not in settings.allow
        ):
            self._records[record.name] = replace(record, error="turned off by the allow/deny lists")
            return
        log.info("importing plugin", plugin=record.name, entry_point=record.entry_point)
        plugin = guard(
            "import",
            entry_point.load,
            limit_s=settings.import_timeout_s,
            limit_name="plugins.import_timeout_s",
        )
        if isinstance(plugin, Failure):
            status = PluginStatus.TIMED_OUT if plugin.timed_out else PluginStatus.FAILED
            self._fail(record, plugin.reason.replace("import raised", "import failed:", 1), status)
            return
        self.register(plugin, record)

    def register(self, plugin: Any, record: PluginRecord) -> None:
        """Register ``plugin`` (a module or object), validating its hook implementations."""
        existing = self._records.get(record.name)
        if existing is not None and existing.status is PluginStatus.LOADED:
            self._fail(record, f"a plugin named {record.name!r} is already loaded")
            return
        try:
            self.manager.register(plugin, name=record.name)
        except ValueError as exc:  # pluggy: the same module or object under another name
            other = self.manager.get_name(plugin)
            also = f" as plugin {other!r}" if other else ""
            self._fail(record, f"not registered: the same plugin object is already loaded{also} ({exc})")
            return
        problem = self._validate(plugin)
        if problem:
            self.manager.unregister(plugin)
            self._fail(record, f"invalid hook implementation: {problem}")
            return
        hooks = tuple(sorted(caller.name for caller in self.manager.get_hookcallers(plugin) or ()))
        self._records[record.name] = replace(record, hooks=hooks, status=PluginStatus.LOADED, error="")
        log.info("plugin loaded", plugin=record.name, hooks=hooks, distribution=record.distribution)

    def _validate(self, plugin: Any) -> str:
        """What is wrong with a registered plugin's hook implementations, or "" when nothing."""
        try:
            self.manager.check_pending()
        except pluggy.PluginValidationError as exc:
            return str(exc)
        for caller in self.manager.get_hookcallers(plugin) or ():
            for impl in caller.get_hookimpls():
                if impl.plugin is plugin and impl.kwargnames:
                    return (
                        f"{caller.name} gives its parameters defaults ({', '.join(impl.kwargnames)}); "
                        "hooks are called by keyword and pluggy never passes a defaulted parameter"
                    )
        return ""

    def _fail(self, record: PluginRecord, error: str, status: PluginStatus = PluginStatus.FAILED) -> None:
        self._records[record.name] = replace(record, status=status, error=error)
        log.warning("plugin failed", plugin=record.name, status=status.value, error=error)

    def collect(self, hook_name: str, **kwargs: Any) -> tuple[list[OfferFrom], list[HookFailure]]:
        """Call every implementation of ``hook_name``; return the valid offers and the failures apart.

        A result must be an offer of the hook's type, a list or tuple of them, or ``None``; anything
        else fails that plugin's whole answer, with the reason.
        """
        offers: list[OfferFrom] = []
        failures: list[HookFailure] = []
        for impl in getattr(self.manager.hook, hook_name).get_hookimpls():
            log.info("calling plugin hook", plugin=impl.plugin_name, hook=hook_name)
            result = guard(
                "hook",
                partial(impl.function, **{name: kwargs[name] for name in impl.argnames}),
                limit_s=self.settings.import_timeout_s,
                limit_name="plugins.import_timeout_s",
            )
            if isinstance(result, Failure):
                failures.append(HookFailure(impl.plugin_name, result))
                continue
            answer = _as_offers(result, OFFER_TYPES[hook_name])
            if isinstance(answer, Failure):
                failures.append(HookFailure(impl.plugin_name, answer))
                continue
            offers.extend(OfferFrom(impl.plugin_name, offer) for offer in answer)
        return offers, failures


def _as_offers(result: Any, offer_type: type[Offer]) -> list[AnyOffer] | Failure:
    """A hook's answer as a list of offers, or why it is not one."""
    if result is None:
        return []
    items = list(result) if isinstance(result, list | tuple) else [result]
    for item in items:
        if not isinstance(item, offer_type):
            shown = repr(item) if isinstance(item, str | int | float) else type(item).__name__
            return Failure(
                f"hook returned {shown[:80]}; expected {offer_type.__name__} offers (one, or a list of them)"
            )
        if not isinstance(item.name, str) or not item.name:
            return Failure(f"hook returned an offer whose name is {item.name!r}; expected a non-empty str")
        if isinstance(item.priority, bool) or not isinstance(item.priority, int):
            return Failure(f"offer {item.name!r} has priority {item.priority!r}; expected an int")
    return items


def _load_order(entry_point: metadata.EntryPoint) -> tuple[bool, str, str]:
    dist = entry_point.dist
    builtin = dist is not None and BUILTIN_PLUGINS.get(entry_point.name) == dist.name
    return (not builtin, entry_point.name, entry_point.value)


def load_plugins(settings: PluginSettings) -> PluginHost:
    """A host with every admitted entry-point plugin loaded (none when autoload is off)."""
    host = PluginHost(settings)
    if settings.autoload:
        host.load_entry_points()
    return host
