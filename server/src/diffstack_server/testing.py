"""Helpers for testing and benchmarking the server with a real engine.

:class:`SpyEngine` wraps an engine to observe and steer it from a test: it records every pipeline
call, can hold a batch (or a model load) at a gate, can hold each job at its first step until that
job's stop signal is visible (so "stops within one step" is exact), and can fake an out-of-memory
batch. It never replaces the engine's work.

:class:`ReferenceRecorder` is a plugin whose ``reference`` wrapper takes an image option and records
what each generation handed it, so a test of any client sees what arrived through the wire.
"""

from __future__ import annotations

import contextlib
import subprocess
import threading
from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from PIL import Image as PILImage
from PIL import ImageStat

from diffstack import Availability, DenoiserWrapper, DenoiserWrapperOffer, ModelInfo, hookimpl, parse_options
from diffstack.config import Settings
from diffstack.engine import GenerationJob, GenerationRequest, GenerationResult, LaunchedBatch, StepEvent
from diffstack.errors import DiffstackError, OutOfMemory
from diffstack.options import Interval
from diffstack.plugins import PluginHost, load_plugins
from diffstack.types import PluginRecord, PluginStatus
from diffstack_client import DiffstackClient
from diffstack_server.background import BackgroundServer
from diffstack_server.protocols import ServingEngine

if TYPE_CHECKING:
    from diffstack.engine.model import LoadedModel

WAIT_S = 30.0
"""The bound on every wait of a test: a broken server fails the test, it never hangs it."""


@contextlib.contextmanager
def serving_client(
    settings: Settings, engine: ServingEngine | None = None, timeout: float = WAIT_S
) -> Iterator[DiffstackClient]:
    """A :class:`BackgroundServer` on ``settings`` (and ``engine``, else its own) and a client of it,
    both closed on exit, the server without grace: a fixture's whole server in one ``with``."""
    server = BackgroundServer(settings, engine).start(ready_timeout=timeout)
    try:
        with DiffstackClient(server.target, timeout=timeout) as client:
            yield client
    finally:
        server.stop(grace=0)


# -------------------------------------------------------------------------------------------------


@dataclass
class JobRecord:
    """What one job (named by its first seed) went through inside the engine."""

    seeds: tuple[int, ...]
    steps_total: int
    callbacks: int = 0
    stopped_at_callback: int | None = None
    outcome: GenerationResult | DiffstackError | None = None


@dataclass
class SpyEngine:
    """An engine, observed and steered: see the module docstring."""

    engine: ServingEngine
    gate: threading.Event | None = None
    load_gate: threading.Event | None = None
    hold_first_step: bool = False
    oom_above: int | None = None
    calls: list[list[tuple[int, ...]]] = field(default_factory=list)
    jobs: dict[int, JobRecord] = field(default_factory=dict)
    entered: threading.Event = field(default_factory=threading.Event)
    loading: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def plugins(self) -> Any:
        return self.engine.plugins

    def resolve(self, name: str) -> str:
        return self.engine.resolve(name)

    def pin(self, key: str) -> LoadedModel | None:
        return self.engine.pin(key)

    def load(self, key: str) -> LoadedModel:
        self.loading.set()
        if self.load_gate is not None and not self.load_gate.wait(WAIT_S):
            raise RuntimeError("the test never opened the load gate")
        return self.engine.load(key)

    def unpin(self, model: LoadedModel) -> None:
        self.engine.unpin(model)

    def unload(self, key: str) -> bool:
        return self.engine.unload(key)

    def free_memory(self) -> list[str]:
        return self.engine.free_memory()

    def models(self) -> Any:
        return self.engine.models()

    def loras(self) -> Any:
        return self.engine.loras()

    def prepare(self, request: GenerationRequest, model: LoadedModel | None = None) -> GenerationRequest:
        return self.engine.prepare(request, model)

    def batch_key(self, request: GenerationRequest) -> Hashable:
        return self.engine.batch_key(request)

    def stats(self) -> dict[str, float]:
        return self.engine.stats()

    def run(self, jobs: Sequence[GenerationJob]) -> list[GenerationResult | DiffstackError]:
        launched = self.launch(jobs)
        return launched.retry(launched.collect())

    def launch(self, jobs: Sequence[GenerationJob]) -> LaunchedBatch:
        with self._lock:
            self.calls.append([job.request.seeds for job in jobs])
        self.entered.set()
        if self.gate is not None and not self.gate.wait(WAIT_S):
            raise RuntimeError("the test never opened the gate")
        if self.oom_above is not None and len(jobs) > self.oom_above:
            raise OutOfMemory(f"fake: a batch of {len(jobs)} does not fit")
        records = [JobRecord(job.request.seeds, job.request.steps) for job in jobs]
        for record in records:
            self.jobs[record.seeds[0]] = record
        launched = self.engine.launch([self._observed(job, r) for job, r in zip(jobs, records, strict=True)])
        return _Recorded(launched, records)

    def _observed(self, job: GenerationJob, record: JobRecord) -> GenerationJob:
        def should_stop() -> DiffstackError | None:
            record.callbacks += 1
            reason = job.should_stop()
            if reason is not None and record.stopped_at_callback is None:
                record.stopped_at_callback = record.callbacks
            return reason

        def on_step(event: StepEvent) -> None:
            if job.on_step is not None:
                job.on_step(event)
            if self.hold_first_step and event.step == 1:
                # Hold the job until its stop signal is visible, so "stops within one step" is exact.
                waiter = threading.Event()
                for _ in range(int(WAIT_S / 0.005)):
                    if job.should_stop() is not None:
                        break
                    waiter.wait(0.005)

        return GenerationJob(request=job.request, on_step=on_step, should_stop=should_stop)

    def served_seeds(self) -> list[int]:
        """First seeds of the jobs that ended with images, one entry per time served."""
        return [s for s, r in self.jobs.items() if isinstance(r.outcome, GenerationResult)]


# -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReferenceOptions:
    """The options of :class:`ReferenceRecorder`'s wrapper."""

    image: PILImage.Image | None = None
    """The reference picture."""
    weight: Annotated[float, Interval(ge=0, le=1)] = 0.5
    """How much it counts."""


@dataclass(frozen=True)
class Seen:
    """What one application of the ``reference`` wrapper was given: the picture's size, its mean
    colour (rounded per channel) and the weight."""

    size: tuple[int, int]
    mean: tuple[int, ...]
    weight: float


@dataclass
class ReferenceRecorder:
    """A plugin offering the ``reference`` wrapper, which takes an image option and records it."""

    seen: list[Seen] = field(default_factory=list)

    def host_with(self, settings: Settings) -> PluginHost:
        """The plugins ``settings`` admit, and this one as ``reference``."""
        host = load_plugins(settings.plugins)
        host.register(self, PluginRecord("reference", "", "", "", (), PluginStatus.LOADED))
        return host

    @hookimpl
    def wrap_denoiser(self, model: ModelInfo) -> list[DenoiserWrapperOffer]:
        return [
            DenoiserWrapperOffer(
                name="reference",
                description="records its reference picture (a test plugin)",
                probe=lambda _model: Availability.yes(),
                apply=self._apply,
                options=ReferenceOptions,
            )
        ]

    def _apply(self, denoiser: Any, options: Mapping[str, Any]) -> DenoiserWrapper:
        parsed = parse_options(ReferenceOptions, options)
        if parsed.image is not None:
            mean = tuple(round(channel) for channel in ImageStat.Stat(parsed.image).mean)
            self.seen.append(Seen(parsed.image.size, mean, parsed.weight))
        return _Detached()


class _Detached:
    """A wrapper that attaches nothing (the recorder only reads its options)."""

    def reset_state(self) -> None:
        pass

    def remove(self) -> None:
        pass


# -------------------------------------------------------------------------------------------------


def make_certificate(
    folder: Path, name: str, ca: tuple[Path, Path] | None = None, alt_names: str = "IP:127.0.0.1"
) -> tuple[Path, Path]:
    """A key and certificate with subject CN ``name`` and the subject alternative names
    ``alt_names`` (openssl's syntax); self-signed (a CA) or signed by ``ca`` (its key and certificate).
    Needs the ``openssl`` command."""
    key, cert = folder / f"{name}.key", folder / f"{name}.pem"
    subject = ["-subj", f"/CN={name}", "-addext", f"subjectAltName={alt_names}"]
    if ca is None:
        command = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2"]
        subprocess.run([*command, "-keyout", key, "-out", cert, *subject], check=True, capture_output=True)
    else:
        request = folder / f"{name}.csr"
        subprocess.run(
            [
                "openssl",
                "req",
                "-new",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                key,
                "-out",
                request,
                *subject,
            ],
            check=True,
            capture_output=True,
        )
        sign: list[str | Path] = [
            "openssl",
            "x509",
            "-req",
            "-in",
            request,
            "-CA",
            ca[1],
            "-CAkey",
            ca[0],
            "-CAcreateserial",
        ]
        subprocess.run(
            [*sign, "-days", "2", "-out", cert, "-copy_extensions", "copy"],
            check=True,
            capture_output=True,
        )
    return key, cert


@dataclass
class _Recorded:
    """A launched batch that notes each job's final outcome in its :class:`JobRecord`."""

    launched: LaunchedBatch
    records: list[JobRecord]

    def collect(self) -> list[GenerationResult | DiffstackError | None]:
        outcomes = self.launched.collect()
        for record, outcome in zip(self.records, outcomes, strict=True):
            record.outcome = outcome
        return outcomes

    def retry(
        self, outcomes: list[GenerationResult | DiffstackError | None]
    ) -> list[GenerationResult | DiffstackError]:
        final = self.launched.retry(outcomes)
        for record, outcome in zip(self.records, final, strict=True):
            record.outcome = outcome
        return final
