"""The decision cache: a valid decision restores without measuring, a changed key or a corrupt file
measures afresh (with a warning for the corrupt one), and nothing is lost."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import structlog

from diffstack.decisions import SLOT_HOOKS, DecisionStore, kept_offers, model_digest
from diffstack.engine.engine import Engine
from diffstack.engine.model import LoadedModel
from diffstack.plugins import load_plugins
from diffstack.testing import baseline_settings
from diffstack.types import CandidateStatus

MODEL = "tiny-sd1"


@pytest.fixture
def start(models_dir: Path, tmp_path: Path) -> Callable[..., tuple[LoadedModel, list[dict[str, Any]]]]:
    """``start(**compose)``: a fresh engine's default model (measured on this CPU) and the log lines
    of its start."""

    def started(**compose: Any) -> tuple[LoadedModel, list[dict[str, Any]]]:
        settings = baseline_settings(
            models_dir,
            MODEL,
            compose={"measure": "always", "repeats": 1, "decisions_dir": tmp_path / "decisions", **compose},
            engine={"warmup_steps": 0},
        )
        with structlog.testing.capture_logs() as logs:
            engine = Engine.start(settings, load_plugins(settings.plugins))
        return engine.model(), logs

    return started


def test_a_restart_restores_the_measured_decision_without_measuring(
    start: Callable[..., tuple[LoadedModel, list[dict[str, Any]]]], tmp_path: Path
) -> None:
    first, _ = start()
    assert first.report.measured and not first.report.restored and first.report.decided_at
    timed = [c.time_ms for s in first.report.slots for c in s.candidates if c.time_ms is not None]
    assert timed  # measured on this CPU: a second measurement would give other times
    saved = tmp_path / "decisions" / f"{MODEL}.json"
    assert saved.is_file()

    again, logs = start()
    assert again.report.restored
    assert again.report.decided_at == first.report.decided_at  # when it was measured, not now
    assert again.report.summary() == first.report.summary()
    assert again.report.slots == first.report.slots  # the measured report, the same times and all
    assert [e for e in logs if e["event"] == "candidate" and e["status"] == "slower"] == []  # none timed
    assert any(e["event"] == "stack restored" for e in logs)


def test_a_changed_key_measures_afresh(
    start: Callable[..., tuple[LoadedModel, list[dict[str, Any]]]],
) -> None:
    first, _ = start()
    changed, _ = start(tie_fraction=0.5)  # a compose setting is part of the key
    assert not changed.report.restored
    assert changed.report.decided_at is not None and changed.report.decided_at > (
        first.report.decided_at or 0
    )


def test_a_corrupt_file_is_set_aside_with_a_warning_and_measured_afresh(
    start: Callable[..., tuple[LoadedModel, list[dict[str, Any]]]], tmp_path: Path
) -> None:
    start()
    saved = tmp_path / "decisions" / f"{MODEL}.json"
    saved.write_text(saved.read_text()[:100])  # cut short, as by a full disk
    model, logs = start()
    assert not model.report.restored and model.report.measured
    assert any(e["event"] == "decision_file_unreadable" and e["log_level"] == "warning" for e in logs)
    assert (tmp_path / "decisions" / f"{MODEL}.corrupt").is_file()  # kept for a look, not deleted
    assert json.loads(saved.read_text())["report"]["measured"] is True  # a good one written again


def test_a_key_mismatch_names_the_parts_that_changed(tmp_path: Path) -> None:
    store = DecisionStore(tmp_path)
    path = store.path_for("m")
    path.parent.mkdir(parents=True, exist_ok=True)
    report = {"model": "m", "family": "sd1", "device": "cpu", "dtype": "float32", "measured": True,
              "notes": [], "slots": []}  # fmt: skip
    path.write_text(json.dumps({"key": {"torch": "1", "card": "a"}, "decided_at": 1.0, "report": report}))
    assert store.load("m", {"torch": "1", "card": "a"}) is not None
    with structlog.testing.capture_logs() as logs:
        assert store.load("m", {"torch": "2", "card": "a"}) is None
    assert [e["changed"] for e in logs if e["event"] == "decision_key_changed"] == [["torch"]]
    assert store.path_for("../evil name") == tmp_path / ".._evil_name.json"


def test_the_model_digest_follows_its_files(tmp_path: Path) -> None:
    (tmp_path / "unet").mkdir()
    weights = tmp_path / "unet" / "w.safetensors"
    weights.write_bytes(b"1234")
    before = model_digest(tmp_path)
    assert model_digest(tmp_path) == before
    weights.write_bytes(b"12345")
    assert model_digest(tmp_path) != before


def test_a_restore_keeps_chosen_and_per_request_offers_only(
    start: Callable[..., tuple[LoadedModel, list[dict[str, Any]]]],
) -> None:
    model, _ = start()
    kept = kept_offers(model.report)
    for slot in model.report.slots:
        for candidate in slot.candidates:
            inside = (candidate.plugin, candidate.offer) in kept[SLOT_HOOKS.get(slot.slot, slot.slot)]
            assert inside == (candidate.status in (CandidateStatus.CHOSEN, CandidateStatus.AVAILABLE))
