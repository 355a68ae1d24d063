"""The plugin host against misbehaving plugins: each fault is recorded with its reason, never raised.

Fakes are small classes, or modules behind real ``importlib.metadata.EntryPoint`` objects. Hangs are
plugin code blocked on an event the test releases afterwards, so nothing sleeps and no thread lingers.
"""

from __future__ import annotations

import importlib.metadata as metadata
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import EulerDiscreteScheduler

from diffstack import plugins as plugin_host
from diffstack.compose import slots
from diffstack.compose.sigmas import compose_sigmas
from diffstack.compose.slots import ModelUnderTest, SlotRecorder, Trial, settle
from diffstack.config import ComposeSettings, PluginSettings
from diffstack.hookspecs import hookimpl
from diffstack.plugins import Failure, PluginHost, guard
from diffstack.types import (
    AttentionOffer,
    Availability,
    CandidateStatus,
    DenoiserKind,
    Family,
    ModelInfo,
    PluginRecord,
    PluginStatus,
    SigmasOffer,
)

MODEL = ModelInfo("m", Family.SD1, DenoiserKind.UNET, "cpu", torch.float32)
QUICK = ComposeSettings(probe_timeout_s=0.2, build_timeout_s=0.2)


@pytest.fixture
def gate() -> Iterator[threading.Event]:
    """An event hung plugin code waits on; set at the end so abandoned threads finish."""
    event = threading.Event()
    yield event
    event.set()


class LogSpy:
    """Stands in for a module's structlog logger (whose configuration other tests may have cached)."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def __getattr__(self, level: str) -> Any:
        return lambda event, **fields: self.events.append({"event": event, **fields})


@pytest.fixture
def logs(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """What the plugin host and composition log, as dicts with the event under "event"."""
    spy = LogSpy()
    monkeypatch.setattr(plugin_host, "log", spy)
    monkeypatch.setattr(slots, "log", spy)
    return spy.events


def host_with(*plugins: tuple[str, object], settings: PluginSettings | None = None) -> PluginHost:
    """A host with ``(name, plugin)`` pairs registered; ``schedules`` counts as the built-in."""
    host = PluginHost(settings)
    for name, plugin in plugins:
        distribution = "diffstack-schedules" if name == "schedules" else f"third-party-{name}"
        host.register(plugin, PluginRecord(name, distribution, "1", name, (), PluginStatus.LOADED))
    return host


def sigmas_model() -> ModelUnderTest:
    """Enough of a model for the sigmas slot: its facts and a real scheduler."""
    scheduler = EulerDiscreteScheduler()
    return ModelUnderTest(MODEL, torch.nn.Identity(), {}, {}, lambda spec: {}, scheduler, measure=False)


def schedule(name: str, priority: int = 0, **fields: Any) -> SigmasOffer:
    fields.setdefault("build", lambda steps, scheduler: None)
    return SigmasOffer(name=name, priority=priority, **fields)


class Schedules:
    """Stands in for the built-in schedules plugin."""

    @hookimpl
    def build_sigmas(self, model: ModelInfo) -> list[SigmasOffer]:
        return [schedule("default", priority=10)]


# -------------------------------------------------------------------------------------------------
# Hooks that answer with something that is not a list of offers
# -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ({"name": "x"}, "hook returned dict; expected SigmasOffer"),
        ([schedule("ok"), "karras"], "hook returned 'karras'; expected SigmasOffer"),
        (
            [AttentionOffer(name="a", build=lambda m: None)],
            "hook returned AttentionOffer; expected SigmasOffer",
        ),
        ([schedule("")], "name is ''"),
        ([schedule("x", priority="high")], "priority 'high'"),  # type: ignore[arg-type]
    ],
)
def test_a_hook_answer_that_is_not_offers_fails_that_plugin_with_the_reason(
    answer: Any, expected: str
) -> None:
    class Odd:
        @hookimpl
        def build_sigmas(self, model: ModelInfo) -> Any:
            return answer

    host = host_with(("odd", Odd()), ("schedules", Schedules()))
    offers, failures = host.collect("build_sigmas", model=MODEL)
    assert [o.offer.name for o in offers] == ["default"]
    assert [f.plugin for f in failures] == ["odd"]
    assert expected in failures[0].error

    decision = compose_sigmas(host, sigmas_model(), QUICK)
    (failed,) = [c for c in decision.report.candidates if c.plugin == "odd"]
    assert failed.status is CandidateStatus.FAILED and expected in failed.reason
    assert decision.auto == "default"


def test_a_probe_that_answers_something_else_than_availability_fails() -> None:
    class Yes:
        @hookimpl
        def build_sigmas(self, model: ModelInfo) -> list[SigmasOffer]:
            return [schedule("truthy", probe=lambda model: True)]  # type: ignore[arg-type,return-value]

    decision = compose_sigmas(host_with(("yes", Yes())), sigmas_model(), QUICK)
    (candidate,) = decision.report.candidates
    assert candidate.status is CandidateStatus.FAILED
    assert candidate.reason == "probe raised TypeError: probe returned bool, expected Availability"


# -------------------------------------------------------------------------------------------------
# Loading: duplicates and defaults
# -------------------------------------------------------------------------------------------------


def test_the_same_module_under_two_entry_point_names_is_recorded_not_raised() -> None:
    host = PluginHost()
    host.load_entry_points(
        [
            metadata.EntryPoint("first", "diffstack_schedules", "diffstack"),
            metadata.EntryPoint("second", "diffstack_schedules", "diffstack"),
        ]
    )
    records = {r.name: r for r in host.records}
    assert records["first"].status is PluginStatus.LOADED
    assert records["second"].status is PluginStatus.FAILED
    assert "already loaded as plugin 'first'" in records["second"].error


def test_a_hook_implementation_with_defaults_is_refused_at_load() -> None:
    class Defaulted:
        @hookimpl
        def build_sigmas(self, model: ModelInfo | None = None) -> list[SigmasOffer]:
            return [schedule("never")]

    host = host_with(("defaulted", Defaulted()))
    (record,) = host.records
    assert record.status is PluginStatus.FAILED
    assert "build_sigmas gives its parameters defaults (model)" in record.error
    assert host.collect("build_sigmas", model=MODEL) == ([], [])


def test_built_ins_load_first_whatever_the_install_order(logs: list[dict[str, Any]]) -> None:
    host = PluginHost()
    host.load_entry_points(
        [
            metadata.EntryPoint("aaa", "diffstack_schedules", "diffstack"),
            *metadata.entry_points(group="diffstack", name="schedules"),
        ]
    )
    imported = [e["plugin"] for e in logs if e["event"] == "importing plugin"]
    assert imported == ["schedules", "aaa"]  # each plugin is logged before it is imported
    assert {r.name: r.status for r in host.records} == {
        "schedules": PluginStatus.LOADED,
        "aaa": PluginStatus.FAILED,
    }


# -------------------------------------------------------------------------------------------------
# Names and ties
# -------------------------------------------------------------------------------------------------


def test_a_third_party_offer_named_like_a_built_in_is_refused() -> None:
    class Impostor:
        @hookimpl
        def build_sigmas(self, model: ModelInfo) -> list[SigmasOffer]:
            return [schedule("default", priority=1000)]

    host = host_with(("impostor", Impostor()), ("schedules", Schedules()))
    decision = compose_sigmas(host, sigmas_model(), QUICK)
    assert decision.auto == "default" and decision.schedules["default"].priority == 10
    (refused,) = [c for c in decision.report.candidates if c.plugin == "impostor"]
    assert refused.status is CandidateStatus.REJECTED
    assert "already offered in this slot by built-in plugin 'schedules'" in refused.reason


def test_between_third_parties_a_contested_name_goes_by_rank_not_install_order() -> None:
    def plugin(priority: int) -> object:
        class Plugin:
            @hookimpl
            def build_sigmas(self, model: ModelInfo) -> list[SigmasOffer]:
                return [schedule("shared", priority=priority)]

        return Plugin()

    for order in ([("zeta", plugin(5)), ("alpha", plugin(5))], [("alpha", plugin(5)), ("zeta", plugin(5))]):
        report = compose_sigmas(host_with(*order), sigmas_model(), QUICK).report
        assert {c.plugin: c.status for c in report.candidates} == {
            "alpha": CandidateStatus.CHOSEN,
            "zeta": CandidateStatus.REJECTED,
        }


def test_settle_breaks_ties_by_priority_then_plugin_then_name() -> None:
    def trial(plugin: str, name: str, priority: int, time_ms: float | None) -> Trial[SigmasOffer, None]:
        return Trial(plugin, schedule(name, priority), time_ms=time_ms)

    trials = [
        trial("b", "x", 1, 10.0),
        trial("a", "y", 1, 10.1),  # tied with the fastest (3%): same priority, "a" sorts first
        trial("a", "x", 1, 10.15),
        trial("c", "z", 0, 9.9),  # fastest of all, but within the tie and of lower priority
        trial("d", "w", 5, 20.0),  # highest priority, twice as slow
    ]
    for ordering in (trials, trials[::-1]):
        slot = SlotRecorder("s")
        winner = settle(slot, ordering, measured=True, tie_fraction=0.03)
        assert winner is not None and (winner.plugin, winner.offer.name) == ("a", "x")
        fates = {(c.plugin, c.offer): (c.status, c.reason) for c in slot.candidates}
        assert fates[("a", "y")] == (CandidateStatus.SLOWER, "tied, same priority, ranked after a/x by name")
        assert fates[("c", "z")] == (CandidateStatus.SLOWER, "tied, lower priority")
        assert fates[("d", "w")] == (CandidateStatus.SLOWER, "2.02x the fastest")

    slot = SlotRecorder("s")
    unmeasured = settle(
        slot, [trial("b", "x", 1, None), trial("a", "x", 1, None)], measured=False, tie_fraction=0
    )
    assert unmeasured is not None and unmeasured.plugin == "a"
    assert slot.candidates[1].status is CandidateStatus.AVAILABLE


# -------------------------------------------------------------------------------------------------
# Hanging plugins
# -------------------------------------------------------------------------------------------------


def test_guard_turns_raising_and_overrunning_code_into_failures(gate: threading.Event) -> None:
    def boom() -> None:
        raise SystemExit(3)

    raised = guard("build", boom, limit_s=1)
    assert raised == Failure("build raised SystemExit: 3")
    hung = guard("probe", gate.wait, limit_s=0.05, limit_name="compose.probe_timeout_s")
    assert isinstance(hung, Failure) and hung.timed_out
    assert hung.status is CandidateStatus.TIMED_OUT
    assert hung.reason == "probe timed out after 0.05 s (compose.probe_timeout_s)"


def test_a_hanging_import_is_recorded_as_timed_out(
    gate: threading.Event, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "hanging_plugin.py").write_text(
        textwrap.dedent(
            """
            import sys

            sys.modules["test_gate_holder"].GATE.wait()
            """
        )
    )
    holder = type(sys)("test_gate_holder")
    holder.GATE = gate  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "test_gate_holder", holder)
    monkeypatch.syspath_prepend(str(tmp_path))
    host = PluginHost(PluginSettings(import_timeout_s=0.1))
    host.load_entry_points(
        [
            metadata.EntryPoint("hangs", "hanging_plugin", "diffstack"),
            *metadata.entry_points(group="diffstack", name="schedules"),
        ]
    )
    records = {r.name: r for r in host.records}
    assert records["hangs"].status is PluginStatus.TIMED_OUT
    assert records["hangs"].error == "import timed out after 0.1 s (plugins.import_timeout_s)"
    assert records["schedules"].status is PluginStatus.LOADED


def test_a_hanging_hook_probe_or_build_is_timed_out_and_the_slot_still_composes(
    gate: threading.Event,
    logs: list[dict[str, Any]],
) -> None:
    def hang(*_: object) -> Any:
        gate.wait()

    class Hook:
        @hookimpl
        def build_sigmas(self, model: ModelInfo) -> list[SigmasOffer]:
            return hang()  # type: ignore[no-any-return]

    class Probe:
        @hookimpl
        def build_sigmas(self, model: ModelInfo) -> list[SigmasOffer]:
            return [schedule("stuck_probe", priority=99, probe=hang)]

    class Build:
        @hookimpl
        def build_sigmas(self, model: ModelInfo) -> list[SigmasOffer]:
            return [schedule("stuck_build", priority=99, build=hang)]

    host = host_with(
        ("hook", Hook()),
        ("probe", Probe()),
        ("build", Build()),
        ("schedules", Schedules()),
        settings=PluginSettings(import_timeout_s=0.1),
    )
    decision = compose_sigmas(host, sigmas_model(), QUICK)
    fates = {c.plugin: (c.status, c.reason) for c in decision.report.candidates}
    assert fates["hook"] == (
        CandidateStatus.TIMED_OUT,
        "hook timed out after 0.1 s (plugins.import_timeout_s)",
    )
    assert fates["probe"] == (
        CandidateStatus.TIMED_OUT,
        "probe timed out after 0.2 s (compose.probe_timeout_s)",
    )
    assert fates["build"] == (
        CandidateStatus.TIMED_OUT,
        "build timed out after 0.2 s (compose.build_timeout_s)",
    )
    assert decision.auto == "default"
    probed = {e["offer"] for e in logs if e["event"] == "probing offer"}
    assert probed == {"stuck_probe", "stuck_build", "default"}  # each logged before its probe ran


# -------------------------------------------------------------------------------------------------
# What offers say of themselves
# -------------------------------------------------------------------------------------------------


def test_a_probe_yes_reason_travels_in_the_candidate_notes() -> None:
    class Explains:
        @hookimpl
        def build_sigmas(self, model: ModelInfo) -> list[SigmasOffer]:
            return [schedule("explained", probe=lambda model: Availability.yes("tables for sd1 found"))]

    (candidate,) = compose_sigmas(
        host_with(("explains", Explains())), sigmas_model(), QUICK
    ).report.candidates
    assert candidate.status is CandidateStatus.CHOSEN
    assert candidate.notes == ("tables for sd1 found",)
