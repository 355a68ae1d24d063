"""The plugin host: discovery through entry points, allow/deny lists, and fault-isolated hook calls.

pluggy's ``firstresult`` would hide the losers and one raising implementation would abort the whole
call, so the host calls each plugin's implementation on its own and keeps every offer tied to the
plugin that made it. A plugin that fails to import, validate or answer is recorded and skipped.
"""

from __future__ import annotations

import importlib.metadata as metadata
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

import pluggy
import structlog

from diffstack import hookspecs
from diffstack.config import PluginSettings
from diffstack.types import AnyOffer, PluginRecord

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class OfferFrom:
    """An offer and the plugin that made it."""

    plugin: str
    offer: AnyOffer


@dataclass(frozen=True)
class HookFailure:
    """A plugin whose hook raised: recorded in the report, never fatal."""

    plugin: str
    error: str


class PluginHost:
    """Owns the pluggy manager and the record of every plugin seen, loaded or not."""

    def __init__(self) -> None:
        self.manager = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self.manager.add_hookspecs(hookspecs)
        self._records: dict[str, PluginRecord] = {}

    @property
    def records(self) -> tuple[PluginRecord, ...]:
        """Every plugin seen, sorted by name: the data behind ``diffstack plugins`` and ListPlugins."""
        return tuple(sorted(self._records.values(), key=lambda r: r.name))

    def load_entry_points(
        self, settings: PluginSettings, entry_points: Iterable[metadata.EntryPoint] | None = None
    ) -> None:
        """Load the plugins of the ``diffstack`` group that the allow/deny lists admit."""
        if entry_points is None:
            entry_points = metadata.entry_points(group=hookspecs.PROJECT_NAME)
        for entry_point in entry_points:
            self._load_entry_point(entry_point, settings)

    def _load_entry_point(self, entry_point: metadata.EntryPoint, settings: PluginSettings) -> None:
        dist = entry_point.dist
        record = PluginRecord(
            name=entry_point.name,
            distribution=dist.name if dist else "",
            version=dist.version if dist else "",
            entry_point=entry_point.value,
            hooks=(),
            status="disabled",
        )
        if entry_point.name in settings.deny or (
            settings.allow is not None and entry_point.name not in settings.allow
        ):
            self._records[record.name] = replace(record, error="turned off by the allow/deny lists")
            return
        try:
            plugin = entry_point.load()
        except Exception as exc:  # any import failure is the plugin's, not ours
            self._fail(record, f"import failed: {type(exc).__name__}: {exc}")
            return
        self.register(plugin, record)

    def register(self, plugin: Any, record: PluginRecord) -> None:
        """Register ``plugin`` (a module or object), validating its hook implementations."""
        if record.name in self._records and self._records[record.name].status == "loaded":
            self._fail(record, f"a plugin named {record.name!r} is already loaded")
            return
        try:
            self.manager.register(plugin, name=record.name)
            self.manager.check_pending()
        except pluggy.PluginValidationError as exc:
            if self.manager.is_registered(plugin):
                self.manager.unregister(plugin)
            self._fail(record, f"invalid hook implementation: {exc}")
            return
        hooks = tuple(sorted(caller.name for caller in self.manager.get_hookcallers(plugin) or ()))
        self._records[record.name] = replace(record, hooks=hooks, status="loaded", error="")
        log.info("plugin loaded", plugin=record.name, hooks=hooks, distribution=record.distribution)

    def _fail(self, record: PluginRecord, error: str) -> None:
        self._records[record.name] = replace(record, status="failed", error=error)
        log.warning("plugin failed", plugin=record.name, error=error)

    def collect(self, hook_name: str, **kwargs: Any) -> tuple[list[OfferFrom], list[HookFailure]]:
        """Call every implementation of ``hook_name``; return the offers and the failures apart."""
        offers: list[OfferFrom] = []
        failures: list[HookFailure] = []
        for impl in getattr(self.manager.hook, hook_name).get_hookimpls():
            try:
                result = impl.function(**{name: kwargs[name] for name in impl.argnames})
            except Exception as exc:
                failures.append(HookFailure(impl.plugin_name, f"{type(exc).__name__}: {exc}"))
                continue
            offers.extend(OfferFrom(impl.plugin_name, offer) for offer in _as_list(result))
        return offers, failures


def _as_list(result: Any) -> list[Any]:
    if result is None:
        return []
    return list(result) if isinstance(result, list | tuple) else [result]


def load_plugins(settings: PluginSettings) -> PluginHost:
    """A host with every admitted entry-point plugin loaded (none when autoload is off)."""
    host = PluginHost()
    if settings.autoload:
        host.load_entry_points(settings)
    return host
