"""The CLI's JSON and the diagnostics RPC render the same StackReport and the same plugin records."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from diffstack.cli import main
from diffstack.render import to_jsonable
from diffstack.testing import BASELINE_PLUGINS
from diffstack.types import (
    CandidateReport,
    CandidateStatus,
    Family,
    PluginRecord,
    PluginStatus,
    SlotReport,
    StackReport,
)
from diffstack_client import DiffstackClient
from diffstack_server.convert import plugin_message, stack_message

MODEL = "tiny-sd1"  # the server tests' model (conftest.py)


def wire_as_json(message: Message, enum_prefix: str) -> Any:
    """A wire message as the CLI's JSON spells it: enum names as their core values, absent optionals
    as null."""
    raw = MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)

    def normal(value: Any, key: str = "") -> Any:
        if isinstance(value, dict):
            return {k: normal(v, k) for k, v in value.items()}
        if isinstance(value, list):
            return [normal(v) for v in value]
        if key == "status":
            return value.removeprefix(enum_prefix).lower().replace("_", " ")
        return value

    return normal(raw)


def with_optionals(expected: Any, fields: tuple[str, ...]) -> Any:
    """Drop the JSON's nulls for optional wire fields, which the wire leaves out instead."""
    if isinstance(expected, dict):
        return {k: with_optionals(v, fields) for k, v in expected.items() if not (k in fields and v is None)}
    if isinstance(expected, list):
        return [with_optionals(v, fields) for v in expected]
    return expected


OPTIONAL = ("numeric_error", "time_ms", "setup_s", "decided_at")


def test_every_field_and_status_renders_the_same_on_both_paths() -> None:
    candidates = tuple(
        CandidateReport(
            plugin=f"p{i}",
            offer=f"o{i}",
            priority=i - 2,
            status=status,
            reason=f"because {i}",
            scope="h8xd40 q64 k64" if i % 2 else "",
            numeric_error=None if i % 3 == 0 else 1e-3 * i,
            time_ms=None if i % 2 else 0.5 * i,
            setup_s=2.5 if status is CandidateStatus.CHOSEN else None,
            notes=("probe said yes", f"note {i}") if i % 2 else (),
        )
        for i, status in enumerate(CandidateStatus)
    )
    assert {f.name for f in dataclasses.fields(CandidateReport)} == set(to_jsonable(candidates[0]))
    report = StackReport(
        model="m",
        family=Family.SDXL,
        device="cuda:0",
        dtype="float16",
        measured=True,
        notes=("a note",),
        slots=(
            SlotReport("select_attention", ("h8xd40 q64 k64: o1",), candidates),
            SlotReport("wrap_denoiser", (), ()),
        ),
        restored=True,
        decided_at=1764548400.5,
    )
    cli = with_optionals(to_jsonable(report), OPTIONAL)
    assert wire_as_json(stack_message(report), "CANDIDATE_STATUS_") == cli

    records = [
        PluginRecord(f"p{i}", "dist", "1.0", "mod", ("build_sigmas",), status, "" if i == 0 else "why")
        for i, status in enumerate(PluginStatus)
    ]
    for record in records:
        # The wire adds the option schemas of the wrappers a plugin offered to loaded models (a
        # server's view, none without models); every field of the record itself renders the same.
        expected = {**to_jsonable(record), "wrappers": []}
        assert wire_as_json(plugin_message(record), "PLUGIN_STATUS_") == expected


def test_cli_stack_json_and_get_stack_agree_on_a_served_model(
    client: DiffstackClient,
    models_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The same model composed twice, once by ``diffstack stack --json`` and once by the server: the
    same report, except the wall-clock seconds of one-off setups and when each was decided."""
    monkeypatch.setenv("DIFFSTACK_PLUGINS__ALLOW", json.dumps(list(BASELINE_PLUGINS)))
    assert main(["--models-dir", str(models_dir), "stack", "--model", MODEL, "--json"]) == 0
    cli = with_optionals(json.loads(capsys.readouterr().out), OPTIONAL)
    # The client's typed report as JSON: its enums are the core's values, absent optionals None.
    wire = with_optionals(json.loads(json.dumps(dataclasses.asdict(client.stack(MODEL)))), OPTIONAL)
    for report in (cli, wire):
        assert report.pop("decided_at") > 0
        for slot in report["slots"]:
            for candidate in slot["candidates"]:
                candidate.pop("setup_s", None)
    assert wire == cli
