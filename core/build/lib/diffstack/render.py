"""Rendering the host's records for people (tables) and machines (JSON-ready dicts)."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from diffstack.types import CandidateReport, PluginRecord, StackReport


def to_jsonable(value: Any) -> Any:
    """Dataclasses, enums and paths as plain JSON values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    return value


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain aligned text table."""
    cells = [[str(c) for c in headers], *[["" if c is None else str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in cells
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def plugins_table(records: Sequence[PluginRecord]) -> str:
    rows = [
        (r.name, r.distribution, r.version, r.entry_point, ", ".join(r.hooks), r.status, r.error)
        for r in records
    ]
    return table(("name", "distribution", "version", "entry point", "hooks", "status", "error"), rows)


def report_text(report: StackReport) -> str:
    """The StackReport as people read it: one block per slot, every candidate with its fate."""
    lines = [f"model {report.model} ({report.family.value}, {report.device}, {report.dtype})"]
    lines += [f"  note: {note}" for note in report.notes]
    for slot in report.slots:
        lines.append("")
        lines.append(f"{slot.slot}: {', '.join(slot.chosen) or '(nothing chosen)'}")
        rows = [
            (
                c.scope,
                c.offer or "-",
                c.plugin,
                c.priority,
                c.status.value,
                _number(c.numeric_error, "{:.1e}"),
                _number(c.time_ms, "{:.3f}"),
                _number(c.setup_s, "{:.2f}"),
                c.reason,
            )
            for c in slot.candidates
        ]
        if rows:
            headers = ("scope", "offer", "plugin", "prio", "status", "rel err", "ms", "setup s", "reason")
            lines.append(_indent(table(headers, rows)))
        lines += _notes(slot.candidates)
    return "\n".join(lines)


def _notes(candidates: Sequence[CandidateReport]) -> list[str]:
    """What offers said of themselves (a probe's yes, a build's notes), once per offer."""
    seen: dict[tuple[str, str], tuple[str, ...]] = {}
    for c in candidates:
        if c.notes:
            seen.setdefault((c.plugin, c.offer), c.notes)
    return [f"  {offer} ({plugin}): {'; '.join(notes)}" for (plugin, offer), notes in seen.items()]


def _number(value: float | None, fmt: str) -> str:
    return "" if value is None else fmt.format(value)


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())
