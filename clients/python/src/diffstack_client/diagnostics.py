"""The diagnostics answers as typed dataclasses with enum names, like the generation events.

``plugins()`` gives :class:`Plugin` records, ``stack()`` a :class:`StackReport`: plain frozen data,
comparable and printable, with statuses as string enums (``PluginStatus.LOADED == "loaded"``) instead
of the wire's integers.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from diffstack_client.v1 import diagnostics_pb2


class PluginStatus(enum.StrEnum):
    """Whether a plugin loaded."""

    UNSPECIFIED = "unspecified"
    LOADED = "loaded"
    FAILED = "failed"
    DISABLED = "disabled"
    TIMED_OUT = "timed_out"


class CandidateStatus(enum.StrEnum):
    """What became of one offer."""

    UNSPECIFIED = "unspecified"
    CHOSEN = "chosen"
    AVAILABLE = "available"
    SLOWER = "slower"
    REJECTED = "rejected"
    FAILED = "failed"
    TIMED_OUT = "timed_out"


def _enum_name(descriptor: Any, value: int, prefix: str) -> str:
    """The wire enum's name without its prefix, lower case (``PLUGIN_STATUS_LOADED`` → ``loaded``)."""
    try:
        return str(descriptor.Name(value)).removeprefix(prefix).lower()
    except ValueError:  # a value a newer server added: shown as unspecified, never a crash
        return "unspecified"


class OptionType(enum.StrEnum):
    """The kind of value a wrapper option takes."""

    UNSPECIFIED = "unspecified"
    BOOL = "bool"
    INT = "int"
    FLOAT = "float"
    STRING = "string"
    IMAGE = "image"


OptionDefault = bool | int | float | str | None


@dataclass(frozen=True)
class OptionSchema:
    """One per-request option of a denoiser wrapper; bounds are None where there are none."""

    name: str
    type: OptionType
    nullable: bool
    default: OptionDefault
    minimum: float | None
    exclusive_minimum: bool
    maximum: float | None
    exclusive_maximum: bool
    description: str

    @classmethod
    def from_message(cls, message: diagnostics_pb2.OptionSchema) -> OptionSchema:
        kind = message.default_value.WhichOneof("kind")
        return cls(
            name=message.name,
            type=OptionType(_enum_name(diagnostics_pb2.OptionType, message.type, "OPTION_TYPE_")),
            nullable=message.nullable,
            default=getattr(message.default_value, kind) if kind else None,
            minimum=message.minimum if message.HasField("minimum") else None,
            exclusive_minimum=message.exclusive_minimum,
            maximum=message.maximum if message.HasField("maximum") else None,
            exclusive_maximum=message.exclusive_maximum,
            description=message.description,
        )


@dataclass(frozen=True)
class WrapperSchema:
    """A denoiser wrapper a request can enable (``wrappers={name: {...}}``) and its options."""

    wrapper: str
    description: str
    options: tuple[OptionSchema, ...]

    @classmethod
    def from_message(cls, message: diagnostics_pb2.WrapperSchema) -> WrapperSchema:
        return cls(
            wrapper=message.wrapper,
            description=message.description,
            options=tuple(OptionSchema.from_message(option) for option in message.options),
        )


@dataclass(frozen=True)
class Plugin:
    """One plugin as the server's host saw it."""

    name: str
    distribution: str
    version: str
    entry_point: str
    hooks: tuple[str, ...]
    status: PluginStatus
    error: str
    wrappers: tuple[WrapperSchema, ...] = ()
    """The denoiser wrappers it offers to loaded models, with their per-request option schemas."""

    @classmethod
    def from_message(cls, message: diagnostics_pb2.Plugin) -> Plugin:
        status = _enum_name(diagnostics_pb2.PluginStatus, message.status, "PLUGIN_STATUS_")
        return cls(
            name=message.name,
            distribution=message.distribution,
            version=message.version,
            entry_point=message.entry_point,
            hooks=tuple(message.hooks),
            status=PluginStatus(status),
            error=message.error,
            wrappers=tuple(WrapperSchema.from_message(wrapper) for wrapper in message.wrappers),
        )


@dataclass(frozen=True)
class Candidate:
    """One offer's fate in one slot (and, for attention, one shape)."""

    plugin: str
    offer: str
    priority: int
    status: CandidateStatus
    reason: str
    scope: str
    numeric_error: float | None
    time_ms: float | None
    setup_s: float | None
    notes: tuple[str, ...]
    """What the offer said of itself: its probe's "yes, because ..." and its build's notes."""

    @classmethod
    def from_message(cls, message: diagnostics_pb2.Candidate) -> Candidate:
        status = _enum_name(diagnostics_pb2.CandidateStatus, message.status, "CANDIDATE_STATUS_")
        return cls(
            plugin=message.plugin,
            offer=message.offer,
            priority=message.priority,
            status=CandidateStatus(status),
            reason=message.reason,
            scope=message.scope,
            numeric_error=message.numeric_error if message.HasField("numeric_error") else None,
            time_ms=message.time_ms if message.HasField("time_ms") else None,
            setup_s=message.setup_s if message.HasField("setup_s") else None,
            notes=tuple(message.notes),
        )


@dataclass(frozen=True)
class SlotReport:
    """One hook's decisions: what was chosen and every candidate."""

    slot: str
    chosen: tuple[str, ...]
    candidates: tuple[Candidate, ...]


@dataclass(frozen=True)
class StackReport:
    """Every decision composition made for one model on the server."""

    model: str
    family: str
    device: str
    dtype: str
    measured: bool
    notes: tuple[str, ...]
    slots: tuple[SlotReport, ...]
    restored: bool = False
    """Whether the server rebuilt this stack from a kept decision instead of measuring it now."""
    decided_at: float | None = None
    """When the decision was made (Unix seconds)."""

    @classmethod
    def from_message(cls, message: diagnostics_pb2.StackReport) -> StackReport:
        return cls(
            model=message.model,
            family=message.family,
            device=message.device,
            dtype=message.dtype,
            measured=message.measured,
            notes=tuple(message.notes),
            slots=tuple(
                SlotReport(
                    slot=slot.slot,
                    chosen=tuple(slot.chosen),
                    candidates=tuple(Candidate.from_message(c) for c in slot.candidates),
                )
                for slot in message.slots
            ),
            restored=message.restored,
            decided_at=message.decided_at if message.HasField("decided_at") else None,
        )

    def slot(self, name: str) -> SlotReport:
        return next(s for s in self.slots if s.slot == name)

    def summary(self) -> dict[str, tuple[str, ...]]:
        """Slot name → chosen offers, the form that travels with every generated image."""
        return {s.slot: s.chosen for s in self.slots}
