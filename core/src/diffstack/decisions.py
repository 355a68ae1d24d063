"""The composition decision kept on disk, so a restart rebuilds the chosen stack without measuring.

Measuring a stack (timing every attention kernel per shape, compiling every compile offer) is most
of a cold start. The decision it reaches depends only on what this file's key names: the card and
its driver, the torch and diffusers versions, every plugin's distribution, version and status, the
model's files, the device, dtype and family, and the compose settings. So after a measured
composition the report is written to ``compose.decisions_dir`` (beside torch-compile's cache by
default), one JSON file per model, and a later load that finds a file with an equal key composes
only the offers that decision chose (plus the per-request ones it found available), untimed, and
keeps the saved report, now marked restored. A different key is logged with the parts that changed
and measured afresh; a file that cannot be read or parsed is set aside as ``*.corrupt`` with a
warning and measured afresh; if the restored offers no longer reproduce the saved choice, that is
logged and the stack is measured afresh. Decisions made without timing (a CPU, by default) are not
kept: there is nothing to skip.

The model's identity is its files' names, sizes and modification times, not a hash of gigabytes of
weights: a restart must take seconds. Replacing a weight file in place with another of the same size
and time would go unnoticed; any copy, download or edit changes the time.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from diffstack.types import CandidateReport, CandidateStatus, Family, SlotReport, StackReport

if TYPE_CHECKING:
    from diffstack.config import ComposeSettings
    from diffstack.plugins import HookFailure, OfferFrom, PluginHost

log = structlog.get_logger(__name__)

FORMAT = 1
"""The file layout's version: part of the key, so a new layout is measured afresh, never misread."""
_KEPT = (CandidateStatus.CHOSEN, CandidateStatus.AVAILABLE)
"""The offers a restore composes: the chosen ones and those enabled per request."""


# -------------------------------------------------------------------------------------------------
# The key
# -------------------------------------------------------------------------------------------------


def decision_key(
    host: PluginHost, model_path: Path, device: str, dtype: str, family: Family, settings: ComposeSettings
) -> dict[str, str]:
    """Everything a measured decision depends on, as strings (compared part by part)."""
    return {
        "format": str(FORMAT),
        "card": _card(device),
        "driver": _driver(device),
        "torch": _version("torch"),
        "diffusers": _version("diffusers"),
        "plugins": ";".join(
            sorted(f"{r.name}={r.distribution}:{r.version}:{r.status}" for r in host.records)
        ),
        "model": model_digest(model_path),
        "device": device,
        "dtype": dtype,
        "family": str(family),
        "compose": json.dumps(settings.model_dump(mode="json", exclude={"decisions_dir"}), sort_keys=True),
    }


def model_digest(path: Path) -> str:
    """A digest of the model's files: relative names, sizes and modification times (see above)."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        stat = file.stat()
        name = file.relative_to(path) if path.is_dir() else file.name
        digest.update(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:32]


def _card(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return str(torch.cuda.get_device_name(torch.device(device)))
    return f"cpu {platform.machine()} {platform.processor()}".strip()


def _driver(device: str) -> str:
    if not device.startswith("cuda"):
        return ""
    import torch

    version = Path("/proc/driver/nvidia/version")
    driver = version.read_text().splitlines()[0] if version.is_file() else ""
    return f"cuda {torch.version.cuda}; {driver}".strip()


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return ""


# -------------------------------------------------------------------------------------------------
# The store
# -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    """A measured stack's report and when it was measured (Unix seconds)."""

    report: StackReport
    decided_at: float


class DecisionStore:
    """One JSON file per model in ``directory``: ``{"key": ..., "decided_at": ..., "report": ...}``;
    and beside it any decision derived from the stack (the server's batch size, say), under the same
    key plus what that decision also depends on (:meth:`load_extra`, :meth:`save_extra`)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory.expanduser()

    def path_for(self, model: str, kind: str = "") -> Path:
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", model) or "default"
        return self.directory / f"{safe}{'.' + kind if kind else ''}.json"

    def load(self, model: str, key: Mapping[str, str]) -> Decision | None:
        """The saved decision for ``model`` if its key equals ``key``; None (logged) otherwise."""
        saved = self._read(self.path_for(model), model, key)
        if saved is None:
            return None
        try:
            return Decision(_report_from(saved["report"]), float(saved["decided_at"]))
        except Exception as exc:
            self._set_aside(self.path_for(model), exc)
            return None

    def save(self, model: str, key: Mapping[str, str], decision: Decision) -> Path:
        """Write atomically (a crash mid-write leaves the old file or none, never half of one)."""
        payload = {"decided_at": decision.decided_at, "report": _to_json(decision.report)}
        return self._write(self.path_for(model), key, payload)

    def load_extra(self, model: str, kind: str, key: Mapping[str, str]) -> dict[str, Any] | None:
        """The ``kind`` decision saved for ``model`` under ``key`` (its JSON object, less the key);
        None when there is none, its key differs (logged) or it is unreadable (set aside, logged)."""
        return self._read(self.path_for(model, kind), model, key)

    def save_extra(self, model: str, kind: str, key: Mapping[str, str], payload: Mapping[str, Any]) -> Path:
        """Keep a ``kind`` decision for ``model`` under ``key`` (atomically, as :meth:`save`)."""
        return self._write(self.path_for(model, kind), key, payload)

    def _read(self, path: Path, model: str, key: Mapping[str, str]) -> dict[str, Any] | None:
        if not path.is_file():
            return None
        try:
            saved = json.loads(path.read_text())
            saved_key = {str(k): str(v) for k, v in saved.pop("key").items()}
        except Exception as exc:
            self._set_aside(path, exc)
            return None
        if saved_key != dict(key):
            changed = sorted(k for k in set(saved_key) | set(key) if saved_key.get(k) != key.get(k))
            log.info("decision_key_changed", model=model, file=path.name, changed=changed)
            return None
        return dict(saved)

    def _write(self, path: Path, key: Mapping[str, str], payload: Mapping[str, Any]) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=self.directory, suffix=".tmp", delete=False) as file:
            json.dump({"key": dict(key), **payload}, file, indent=1)
        os.replace(file.name, path)
        return path

    @staticmethod
    def _set_aside(path: Path, exc: Exception) -> None:
        aside = path.with_suffix(".corrupt")
        os.replace(path, aside)
        log.warning("decision_file_unreadable", path=str(path), moved_to=str(aside), error=str(exc)[:200])


def _to_json(report: StackReport) -> dict[str, Any]:
    return asdict(replace(report, restored=False, decided_at=None))


def _report_from(data: Mapping[str, Any]) -> StackReport:
    slots = tuple(
        SlotReport(
            slot=str(slot["slot"]),
            chosen=tuple(slot["chosen"]),
            candidates=tuple(
                CandidateReport(**{**c, "status": CandidateStatus(c["status"]), "notes": tuple(c["notes"])})
                for c in slot["candidates"]
            ),
        )
        for slot in data["slots"]
    )
    return StackReport(
        model=str(data["model"]),
        family=Family(data["family"]),
        device=str(data["device"]),
        dtype=str(data["dtype"]),
        measured=bool(data["measured"]),
        notes=tuple(data["notes"]),
        slots=slots,
    )


# -------------------------------------------------------------------------------------------------
# Composing only what a decision chose
# -------------------------------------------------------------------------------------------------


def kept_offers(report: StackReport) -> dict[str, frozenset[tuple[str, str]]]:
    """Hook name → the (plugin, offer) pairs a restore composes (a hook that feeds two slots, such
    as ``compile_model`` for ``compile_vae``, keeps the union of both)."""
    kept: dict[str, frozenset[tuple[str, str]]] = {}
    for slot in report.slots:
        hook = SLOT_HOOKS.get(slot.slot, slot.slot)
        pairs = frozenset((c.plugin, c.offer) for c in slot.candidates if c.status in _KEPT)
        kept[hook] = kept.get(hook, frozenset()) | pairs
    return kept


SLOT_HOOKS = {"compile_vae": "compile_model"}
"""Slots named otherwise than the hook whose offers they decide."""


def restricted_host(host: PluginHost, report: StackReport) -> PluginHost:
    """``host``, answering each hook with only the offers ``report`` kept."""
    from diffstack.plugins import PluginHost

    keep = kept_offers(report)

    class Restricted(PluginHost):
        def __init__(self) -> None:  # shares the loaded host's state; only collect differs
            self.__dict__.update(host.__dict__)

        def collect(self, hook_name: str, **kwargs: Any) -> tuple[list[OfferFrom], list[HookFailure]]:
            offers, _ = host.collect(hook_name, **kwargs)
            wanted = keep.get(hook_name, frozenset())
            return [o for o in offers if (o.plugin, o.offer.name) in wanted], []

    return Restricted()


def same_choice(slots: Sequence[SlotReport], report: StackReport) -> bool:
    """Whether freshly composed ``slots`` chose what ``report`` chose, slot by slot."""
    return {s.slot: s.chosen for s in slots} == report.summary()
