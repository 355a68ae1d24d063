"""The engine's device thread: the one thread that loads models and runs every batch.

CUDA graphs (torch.compile's ``reduce-overhead``, stable-fast) replay only on the thread that recorded
them, and loading a model records them while composing and warming up. So everything that touches the
device (starting the engine, loading a model, running a batch) goes through one
:class:`EngineWorker`: ``submit(fn) -> Future`` runs ``fn`` on its thread, in order. The gRPC server,
the CLI and a replica host (Ray Serve) all host the engine through this object and need no thread
rules of their own; cheap calls (resolving a name, finding a loaded model, validating a request) run on
the caller's thread and never wait behind a batch or a load.

The thread is a daemon and :meth:`EngineWorker.stop` never waits for it: a plugin stuck inside a
call cannot keep the process alive after the server stops.
"""

from __future__ import annotations

import contextvars
import queue
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import structlog

from diffstack.errors import FieldViolation, InvalidRequest, NotReady

if TYPE_CHECKING:
    from diffstack.config import Settings
    from diffstack.engine.model import LoadedModel
    from diffstack.engine.requests import (
        GenerationJob,
        GenerationRequest,
        GenerationResult,
        LoraListing,
        ModelListing,
    )
    from diffstack.errors import DiffstackError
    from diffstack.plugins import PluginHost
    from diffstack.types import PluginRecord

log = structlog.get_logger(__name__)

T = TypeVar("T")


class LaunchedBatch(Protocol):
    """A batch launched on the device thread (:class:`diffstack.engine.run.PendingBatch`)."""

    def collect(self) -> list[GenerationResult | DiffstackError | None]:
        """Wait for its images (any thread); None marks a job to :meth:`retry`."""
        ...

    def retry(
        self, outcomes: list[GenerationResult | DiffstackError | None]
    ) -> list[GenerationResult | DiffstackError]:
        """Rerun the None jobs on the reference stack (device thread); every job's outcome."""
        ...


class ServingEngine(Protocol):
    """The engine as its hosts use it; :class:`diffstack.engine.Engine` satisfies it."""

    @property
    def plugins(self) -> tuple[PluginRecord, ...]: ...

    def resolve(self, name: str) -> str: ...

    def pin(self, key: str) -> LoadedModel | None: ...

    def load(self, key: str) -> LoadedModel: ...

    def unpin(self, model: LoadedModel) -> None: ...

    def unload(self, key: str) -> bool: ...

    def free_memory(self) -> list[str]: ...

    def models(self) -> list[ModelListing]: ...

    def loras(self) -> list[LoraListing]: ...

    def prepare(self, request: GenerationRequest, model: LoadedModel | None = None) -> GenerationRequest: ...

    def batch_key(self, request: GenerationRequest) -> Hashable: ...

    def run(self, jobs: Sequence[GenerationJob]) -> list[GenerationResult | DiffstackError]: ...

    def launch(self, jobs: Sequence[GenerationJob]) -> LaunchedBatch: ...

    def stats(self) -> dict[str, float]: ...


@dataclass
class _Call:
    future: Future[Any]
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    context: contextvars.Context


class EngineWorker:
    """Owns the device thread and the engine on it: start, load, run, stop.

    Give it a started ``engine`` (tests, benchmarks) or let :meth:`start` build one from ``settings``
    on the device thread: the plugins load first (:attr:`plugins` answers from then on), then the
    default model loads and its stack composes.
    """

    def __init__(
        self, settings: Settings, engine: ServingEngine | None = None, *, name: str = "diffstack-engine"
    ) -> None:
        self.settings = settings
        self._engine = engine
        self._host: PluginHost | None = None
        self._calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._stopped = False
        self._started: Future[ServingEngine] | None = None
        self._guard = threading.Lock()  # submitting vs stopping
        self._starting = threading.Lock()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    # -- the thread --------------------------------------------------------------------------------

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        """Run ``fn(*args, **kwargs)`` on the device thread after what was submitted before; the
        caller's context variables (request ids for the logs) go with it. NotReady once stopped."""
        future: Future[T] = Future()
        with self._guard:
            if self._stopped:
                raise NotReady("the engine is stopping")
            self._calls.put(_Call(future, fn, args, kwargs, contextvars.copy_context()))
        return future

    def _serve(self) -> None:
        while True:
            call = self._calls.get()
            if call is None:
                return
            if not call.future.set_running_or_notify_cancel():
                continue
            try:
                result = call.context.run(call.fn, *call.args, **call.kwargs)
            except BaseException as exc:
                call.future.set_exception(exc)
            else:
                call.future.set_result(result)

    @property
    def on_device_thread(self) -> bool:
        return threading.current_thread() is self._thread

    # -- the engine --------------------------------------------------------------------------------

    def start(self) -> Future[ServingEngine]:
        """Start the engine on the device thread (once; later calls return the same future)."""
        with self._starting:
            if self._started is None:
                if self._engine is not None:
                    self._started = Future()
                    self._started.set_result(self._engine)
                else:
                    self._started = self.submit(self._start_engine)
            return self._started

    def _start_engine(self) -> ServingEngine:
        from diffstack.engine.engine import Engine  # torch and diffusers load here, on this thread
        from diffstack.plugins import load_plugins

        started = time.perf_counter()
        self._host = load_plugins(self.settings.plugins)
        plugins_s = time.perf_counter() - started
        log.info("plugins_loaded", plugins=len(self._host.records), seconds=round(plugins_s, 2))
        engine = Engine.start(self.settings, self._host)
        engine.plugins_s = plugins_s
        self._engine = engine
        return engine

    @property
    def engine(self) -> ServingEngine | None:
        """The engine once started, else None."""
        return self._engine

    @property
    def plugins(self) -> tuple[PluginRecord, ...] | None:
        """The plugin records as soon as the plugins loaded (before the models compose), else None."""
        if self._engine is not None:
            return self._engine.plugins
        return self._host.records if self._host is not None else None

    def checkout(self, name: str, *, may_load: bool) -> Future[LoadedModel]:
        """Model ``name`` ("" for the default), pinned: release it with ``engine.unpin(model)``.

        The name is resolved on the caller's thread (unknown names fail at once); a loaded model is
        found there too. A model that is not loaded is loaded on the device thread if ``may_load``,
        else refused with InvalidRequest naming the field ``model``.
        """
        engine = self._require_engine()
        key = engine.resolve(name)
        model = engine.pin(key)
        if model is not None:
            done: Future[LoadedModel] = Future()
            done.set_result(model)
            return done
        if not may_load:
            raise InvalidRequest(
                FieldViolation(
                    "model",
                    f"model {key!r} is not loaded, and this server loads models only at its admin's "
                    "request (engine.preload, engine.load_on_request)",
                )
            )
        return self.submit(engine.load, key)

    def run(self, jobs: Sequence[GenerationJob]) -> Future[list[GenerationResult | DiffstackError]]:
        """Run prepared jobs that share one batch key as one pipeline call on the device thread."""
        return self.submit(self._require_engine().run, jobs)

    def _require_engine(self) -> ServingEngine:
        if self._engine is None:
            raise NotReady("the server is starting: the model is loading and its stack warming up")
        return self._engine

    # -- stopping ----------------------------------------------------------------------------------

    def stop(self) -> None:
        """Refuse new calls, cancel the ones not started; the running call (if any) finishes on its
        own. Never waits: see :meth:`join`."""
        with self._guard:
            if self._stopped:
                return
            self._stopped = True
            while True:
                try:
                    pending = self._calls.get_nowait()
                except queue.Empty:
                    break
                if pending is not None:
                    pending.future.cancel()
            self._calls.put(None)

    def join(self, timeout: float | None = None) -> bool:
        """Wait up to ``timeout`` seconds for the thread to end after :meth:`stop`; False if a call is
        still running (a stuck plugin, say)."""
        self._thread.join(timeout)
        return not self._thread.is_alive()
