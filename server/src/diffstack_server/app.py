"""Building, starting, draining and serving the gRPC server.

``create_server(settings, engine=None)`` builds the whole server and binds its port (0 gives a free
one); the CLI, the tests and the benchmarks all use it. ``serve(settings)`` only adds signal handling
and waits. Start-up order, as load balancers expect it: the port opens at once with health
NOT_SERVING, the engine starts on its worker's device thread (plugins first, so ListPlugins answers
while the models still compose and warm), then health turns SERVING. On SIGTERM or SIGINT: health
NOT_SERVING, new generation requests get UNAVAILABLE, queued and running requests finish within
``server.grace_seconds`` (what is left then fails with UNAVAILABLE, so clients retry elsewhere), the
process exits 0 (a second signal stops the work at once). The process exits even when a plugin never
returns on the device thread.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from diffstack.config import Settings
from diffstack.engine import EngineWorker, ServingEngine
from diffstack.errors import NotReady
from diffstack.logs import configure_logging
from diffstack.render import to_jsonable
from diffstack.types import StackReport
from diffstack_client.v1 import diagnostics_pb2, diagnostics_pb2_grpc, generation_pb2, generation_pb2_grpc
from diffstack_server.batching import BatchQueue
from diffstack_server.encoding import ImageEncoder, encode_threads
from diffstack_server.interceptors import AdminTokenInterceptor, StatusInterceptor
from diffstack_server.keys import ApiKeyInterceptor, KeyRing, load_keys
from diffstack_server.metrics import Metrics
from diffstack_server.servicers import DiagnosticsServicer, GenerationServicer, Runtime
from diffstack_server.sizing import (
    BatchSizeChoice,
    choose_batch_size,
    expected_wrapper_warm_s,
    unwarmed_wrappers,
    warm_next,
    warm_wrapper,
)

log = structlog.get_logger("diffstack.server")

GENERATION_SERVICE = generation_pb2.DESCRIPTOR.services_by_name["GenerationService"].full_name
DIAGNOSTICS_SERVICE = diagnostics_pb2.DESCRIPTOR.services_by_name["DiagnosticsService"].full_name
HEALTH_SERVICES = ("", GENERATION_SERVICE, DIAGNOSTICS_SERVICE)
"""Health is reported for the whole server ("") and for each diffstack service."""


class DiffstackServer:
    """A gRPC server with its engine worker, queue, health and metrics; made by :func:`create_server`."""

    def __init__(
        self,
        settings: Settings,
        grpc_server: grpc.aio.Server,
        runtime: Runtime,
        health_servicer: health.aio.HealthServicer,
        port: int,
    ) -> None:
        self.settings = settings
        self.grpc_server = grpc_server
        self.runtime = runtime
        self.health = health_servicer
        self.port = port
        self.metrics_port: int | None = None
        self.engine_error: BaseException | None = None
        self.batch_size: BatchSizeChoice | None = None
        """How the batch size was chosen, once the server is ready."""
        self.failure: str | None = None
        """Why the server can no longer serve (a rank of its parallel group failed), else None."""
        self.ready = asyncio.Event()
        """Set once the engine is up (or failed to start: see :attr:`engine_error`)."""
        self._engine_task: asyncio.Task[None] | None = None
        self._warm_task: asyncio.Task[None] | None = None
        self._stopping = False
        self._stopped = asyncio.Event()

    @property
    def worker(self) -> EngineWorker:
        return self.runtime.worker

    @property
    def engine(self) -> ServingEngine | None:
        return self.runtime.worker.engine

    async def start(self) -> None:
        """Open the port (health NOT_SERVING) and bring the engine up; returns before it is ready."""
        server_settings = self.settings.server
        for service in HEALTH_SERVICES:
            await self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.grpc_server.start()
        if server_settings.metrics:
            token = server_settings.admin_token if server_settings.metrics_require_token else None
            try:
                self.metrics_port = self.runtime.metrics.serve_http(
                    server_settings.metrics_host, server_settings.metrics_port, token=token
                )
            except OSError as exc:  # metrics are worth a log line, never the service itself
                log.error("metrics unavailable", port=server_settings.metrics_port, error=str(exc))
        log.info("listening", host=server_settings.host, port=self.port, metrics_port=self.metrics_port)
        self._engine_task = asyncio.get_running_loop().create_task(
            self._bring_up(), name="diffstack-engine-up"
        )

    async def _bring_up(self) -> None:
        started = time.perf_counter()
        try:
            await asyncio.wrap_future(self.worker.start())
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # recorded and logged; serve() exits 1, health stays NOT_SERVING
            self.engine_error = exc
            log.exception("engine_start_failed")
            self.ready.set()  # wake the waiters; they check engine_error
            return
        engine_s = time.perf_counter() - started
        log.info("engine_started", seconds=round(engine_s, 2))
        try:
            await self._size_batches()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # as fatal as a failed start: the default model cannot run a batch
            self.engine_error = exc
            log.exception("batch_sizing_failed")
            self.ready.set()
            return
        engine = self.runtime.started_engine()
        wrappers = await self._wrappers_to_warm(engine)
        default = await self.runtime.checkout("")
        try:
            log_stack_decisions(default.report)
            model_startup, restored = dict(default.startup), default.report.restored
        finally:
            engine.unpin(default)
        self.runtime.queue.start()
        if not self._stopping and self.failure is None:
            for service in HEALTH_SERVICES:
                await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
            total_s = time.perf_counter() - started
            self.runtime.startup.update(
                startup_summary(engine, model_startup, engine_s, self.batch_size, total_s)
            )
            sizes = self.batch_size.pending if self.batch_size is not None else []
            self.runtime.startup["warm_after_serving"] = float(len(sizes) + len(wrappers))
            # Where start-up went, in one line (each phase is also logged on its own above), and
            # what is left to warm after SERVING (batch sizes, then wrappers such as DeepCache).
            log.info(
                "startup",
                stack_restored=restored,
                to_warm_after_serving={"batch_sizes": list(sizes), "wrappers": wrappers},
                **_rounded(self.runtime.startup),
            )
            log.info("serving", seconds=round(total_s, 2), stack_restored=restored)
            if self.batch_size is not None and (sizes or wrappers):
                self._warm_task = asyncio.get_running_loop().create_task(
                    warm_pending(self.runtime, self.batch_size), name="diffstack-warm-batches"
                )
        self.ready.set()

    async def fail(self, reason: str) -> None:
        """Health NOT_SERVING for good: a part the server cannot serve without has failed (a rank of
        its context-parallel group). Requests get UNAVAILABLE from the engine; a restart recovers."""
        if self.failure is None:
            self.failure = reason
            log.error("not_serving", reason=reason)
        for service in HEALTH_SERVICES:
            await self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)

    async def _wrappers_to_warm(self, engine: ServingEngine) -> list[str]:
        """The default model's wrappers left for :func:`warm_pending` after SERVING; with
        ``server.warm_before_serving`` they are warmed now instead."""
        if not self.settings.server.warm_wrappers:
            return []
        if self.settings.server.warm_before_serving:
            for name in await asyncio.wrap_future(self.worker.submit(unwarmed_wrappers, engine)):
                try:
                    await asyncio.wrap_future(
                        self.worker.submit(
                            warm_wrapper,
                            engine,
                            name,
                            self.settings.server,
                            decisions_dir=self.settings.compose.decisions_dir,
                        )
                    )
                except Exception:  # the wrapper compiles on its first use instead; serving goes on
                    log.exception("wrapper_warm_up_failed", wrapper=name)
        return await asyncio.wrap_future(self.worker.submit(unwarmed_wrappers, engine))

    async def _size_batches(self) -> None:
        self.batch_size = await size_batches(self.runtime)

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until the engine is up (raises what engine start-up raised)."""
        await asyncio.wait_for(self.ready.wait(), timeout)
        if self.engine_error is not None:
            raise RuntimeError("the engine failed to start") from self.engine_error

    async def stop(self, grace: float | None = None) -> None:
        """Drain: health NOT_SERVING, refuse new work, finish queued and running work within ``grace``
        seconds (default ``server.grace_seconds``), then close the port. Work still queued or running
        when the grace runs out fails with UNAVAILABLE (retry elsewhere). Never waits for the engine's
        device thread beyond the grace: see :attr:`engine_stuck`. Safe to call twice."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        grace = self.settings.server.grace_seconds if grace is None else grace
        give_up_at = time.monotonic() + grace
        queue = self.runtime.queue
        queue.close()
        await self.health.enter_graceful_shutdown()
        log.info("draining", grace_s=grace, queued=queue.depth, running=queue.in_flight)
        for task in (self._engine_task, self._warm_task):
            if task is not None and not task.done():
                task.cancel()  # the device thread finishes its call on its own; we stop waiting
        if not await queue.drain(max(0.0, give_up_at - time.monotonic())):
            log.warning("grace_expired", queued=queue.depth, running=queue.in_flight)
            queue.abort(NotReady("the server is shutting down; retry on another replica"))
        await queue.stop(timeout=max(1.0, give_up_at - time.monotonic()))
        self.worker.stop()
        # Handlers still encoding or sending their last message get the rest of the grace period.
        await self.grpc_server.stop(max(0.5, give_up_at - time.monotonic()))
        self.runtime.metrics.close()
        self.runtime.encoder.close()
        log.info("stopped")
        self._stopped.set()

    @property
    def engine_stuck(self) -> bool:
        """After :meth:`stop`: a call on the engine's device thread (a plugin, say) never returned."""
        return self._stopping and not self.worker.join(timeout=0.5)

    async def wait_for_termination(self) -> None:
        await self._stopped.wait()


async def size_batches(runtime: Runtime) -> BatchSizeChoice | None:
    """Choose (restore or measure) the batch size on the device thread before SERVING; the batcher
    forms batches up to the largest size already warmed (:func:`warm_pending` raises it), and the
    measured time seeds the queue's deadline estimates."""
    engine = runtime.worker.engine
    if engine is None:
        return None
    started = time.perf_counter()
    choice = await asyncio.wrap_future(
        runtime.worker.submit(
            choose_batch_size,
            engine,
            runtime.settings.server,
            decisions_dir=runtime.settings.compose.decisions_dir,
        )
    )
    queue = runtime.queue
    queue.max_batch = choice.ready_size
    if choice.size in choice.batch_seconds:
        queue.timing.observe(choice.units_per_image * choice.size, choice.batch_seconds[choice.size])
    log.info("batches_ready", size=queue.max_batch, seconds=round(time.perf_counter() - started, 2))
    return choice


WARM_IDLE_WAIT_S = 1.0
"""How long a pending batch size's warm-up waits for a pause in client batches before it runs anyway
(it takes a few batches' time, and admission counts it while it runs)."""
WARM_QUIET_S = 0.1
"""A batch size's pause is the queue quiet this long: a client that sends its next request as soon as
its last one answered (or as soon as the server turned SERVING) goes first. A wrapper's warm-up,
which holds the device thread far longer, waits for ``server.wrapper_warm_quiet_s`` instead."""


async def wait_for_pause(
    queue: BatchQueue, quiet_s: float = WARM_QUIET_S, at_most_s: float | None = WARM_IDLE_WAIT_S
) -> None:
    """Return once nothing has been queued, prepared or running for ``quiet_s``
    (:meth:`~diffstack_server.batching.BatchQueue.quiet_s`: a request that came and went meanwhile
    starts the quiet over), or after ``at_most_s`` (None: only at a real pause, however long that
    takes)."""
    give_up_at = math.inf if at_most_s is None else time.monotonic() + at_most_s
    while (left := give_up_at - time.monotonic()) > 0:
        if not await queue.wait_idle(None if math.isinf(left) else left):
            return
        quiet = queue.quiet_s()
        if quiet >= quiet_s:
            return
        await asyncio.sleep(min(quiet_s - quiet, max(0.0, give_up_at - time.monotonic())))


async def warm_pending(runtime: Runtime, choice: BatchSizeChoice) -> None:
    """After SERVING: warm the sizes still pending, smallest first, then the default model's wrappers
    still unwarmed (:func:`~diffstack_server.sizing.warm_wrapper`), each as one call on the device
    thread in a pause between client batches (:func:`wait_for_pause`; a wrapper, whose compile can
    hold the device thread for a minute, only after ``server.wrapper_warm_quiet_s`` of quiet); the
    batcher forms each size once it and every smaller one are warmed. Each runs inside the queue's
    :meth:`~diffstack_server.batching.BatchQueue.hold` with its expected time (a size's scaled batch
    time, a wrapper's time kept from the last start), so admission refuses at once what cannot finish
    after it. A failed warm-up is logged and ends the warming: serving goes on with the sizes
    reached (a wrapper not warmed compiles on its first use)."""
    queue, engine, settings = runtime.queue, runtime.started_engine(), runtime.settings.server
    decisions_dir = runtime.settings.compose.decisions_dir
    started = time.perf_counter()
    while choice.pending and not queue.closed:
        await wait_for_pause(queue)
        size = choice.pending[0]
        try:
            with queue.hold(f"batches of {size} images", choice.expected_warm_s(size)):
                ready = await asyncio.wrap_future(runtime.worker.submit(warm_next, engine, choice, settings))
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("batch_warm_up_failed", size=size, serving_up_to=queue.max_batch)
            return
        queue.max_batch = ready
    graphs = {f"graphs_{size}_s": seconds for size, seconds in sorted(choice.warm_s.items())}
    runtime.startup.update(batch_warm_after_serving_s=time.perf_counter() - started, **graphs)
    log.info(
        "batches_warmed",
        size=queue.max_batch,
        seconds=round(time.perf_counter() - started, 2),
        per_size={size: round(s, 2) for size, s in choice.warm_s.items()},
    )
    for name in await asyncio.wrap_future(runtime.worker.submit(unwarmed_wrappers, engine)):
        if queue.closed:
            return
        expected = await asyncio.wrap_future(
            runtime.worker.submit(expected_wrapper_warm_s, engine, name, settings, decisions_dir)
        )
        await wait_for_pause(queue, settings.wrapper_warm_quiet_s, at_most_s=None)
        try:
            with queue.hold(f"{name}'s compiled variant", expected):
                seconds = await asyncio.wrap_future(
                    runtime.worker.submit(warm_wrapper, engine, name, settings, decisions_dir=decisions_dir)
                )
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("wrapper_warm_up_failed", wrapper=name)
            return
        runtime.startup[f"wrapper_{name}_warm_s"] = seconds


def startup_summary(
    engine: ServingEngine,
    model: dict[str, float],
    engine_s: float,
    choice: BatchSizeChoice | None,
    total_s: float,
) -> dict[str, float]:
    """Seconds by phase of start-up: imports (torch, diffusers), plugins, the default model's
    loading, composing (measuring or restoring its stack; a cold compile is in it), warm-up (its first
    pipeline calls: compiling from cache and recording CUDA graphs), the batch size's measurement, and
    the sizes warmed before SERVING."""
    plugins = float(getattr(engine, "plugins_s", 0.0))
    known = plugins + sum(model.values())
    summary = {"imports_s": max(0.0, engine_s - known), "plugins_s": plugins, **model}
    if choice is not None:
        summary["batch_measure_s"] = choice.measure_s
        summary["batch_size"] = float(choice.size)
        summary["batch_size_restored"] = float(choice.restored)
        summary.update({f"graphs_{size}_s": s for size, s in sorted(choice.warm_s.items())})
    summary["to_serving_s"] = total_s
    return summary


def _rounded(values: dict[str, float]) -> dict[str, float]:
    return {name: round(value, 2) for name, value in values.items()}


def log_stack_decisions(report: StackReport) -> None:
    """Log every decision of the default model's stack at start-up, one line per slot, reasons and
    measurements included (as Triton logs its model table), so an admin sees why without asking."""
    log.info(
        "stack", model=report.model, family=report.family.value, device=report.device, notes=report.notes
    )
    for slot in report.slots:
        candidates = [
            {key: value for key, value in to_jsonable(candidate).items() if value not in (None, "")}
            for candidate in slot.candidates
        ]
        log.info("stack slot", slot=slot.slot, chosen=slot.chosen, candidates=candidates)


def _start_engine(settings: Settings) -> ServingEngine:
    """Import and start the engine: torch and diffusers load here, in a worker thread, after the port
    has opened (health NOT_SERVING), so probes get answers from the first second."""
    from diffstack.engine import Engine

    return Engine.start(settings)


def _bind_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS credentials from ``server.tls_cert``/``tls_key``; mTLS when ``tls_client_ca`` is set too."""
    server = settings.server
    if server.tls_cert is None and server.tls_key is None:
        if server.tls_client_ca is not None:
            raise ValueError("server.tls_client_ca needs server.tls_cert and server.tls_key")
        return None
    if server.tls_cert is None or server.tls_key is None:
        raise ValueError("TLS needs both server.tls_cert and server.tls_key")
    client_ca = server.tls_client_ca.read_bytes() if server.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(server.tls_key.read_bytes(), server.tls_cert.read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def build_runtime(
    settings: Settings, engine: ServingEngine | None = None, worker: EngineWorker | None = None
) -> Runtime:
    """What the servicers share (engine worker, queue, metrics, encoder), for any host of them: the
    grpc.aio server below, or a Ray Serve replica (``diffstack-ray``). ``worker`` replaces the plain
    :class:`EngineWorker` (rank 0 of a context-parallel group brings its own)."""
    server_settings = settings.server
    metrics = Metrics()
    worker = worker if worker is not None else EngineWorker(settings, engine)
    queue = BatchQueue(
        worker,
        metrics,
        queue_size=server_settings.queue_size,
        max_batch=min(server_settings.batch_size or server_settings.max_batch, server_settings.max_batch),
        batch_wait_ms=server_settings.batch_wait_ms,
    )
    encoder = ImageEncoder(encode_threads(server_settings.encode_threads))
    return Runtime(settings=settings, worker=worker, queue=queue, metrics=metrics, encoder=encoder)


async def create_server(
    settings: Settings, engine: ServingEngine | None = None, *, worker: EngineWorker | None = None
) -> tuple[DiffstackServer, int]:
    """Build the server and bind its port (``server.port`` 0 picks a free one); call ``start()`` next.

    Without ``engine`` the server's :class:`~diffstack.engine.EngineWorker` starts
    :class:`diffstack.engine.Engine` from ``settings`` on its device thread after the port opens; tests
    and benchmarks may pass an engine that is already started.
    Call it inside the event loop that will run the server.
    """
    server_settings, limits = settings.server, settings.limits
    if server_settings.metrics_require_token and not server_settings.admin_token:
        raise ValueError("server.metrics_require_token needs server.admin_token")
    runtime = build_runtime(settings, engine, worker)
    metrics = runtime.metrics
    interceptors: list[grpc.aio.ServerInterceptor] = [StatusInterceptor(metrics)]
    if server_settings.admin_token:
        interceptors.append(AdminTokenInterceptor(server_settings.admin_token))
    api_keys = load_keys(settings)
    if api_keys:
        interceptors.append(ApiKeyInterceptor(KeyRing(api_keys, metrics.registry)))
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", limits.request_message_bytes),
        ("grpc.max_send_message_length", limits.response_message_bytes),
        ("grpc.so_reuseport", 0),  # a busy port is an error, never silently shared
    ]
    grpc_server = grpc.aio.server(interceptors=interceptors, options=options)
    generation_pb2_grpc.add_GenerationServiceServicer_to_server(GenerationServicer(runtime), grpc_server)
    diagnostics_pb2_grpc.add_DiagnosticsServiceServicer_to_server(DiagnosticsServicer(runtime), grpc_server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, grpc_server)
    if server_settings.reflection:
        reflection.enable_server_reflection(
            (GENERATION_SERVICE, DIAGNOSTICS_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME),
            grpc_server,
        )
    address = _bind_address(server_settings.host, server_settings.port)
    credentials = server_credentials(settings)
    if credentials is None:
        port = grpc_server.add_insecure_port(address)
    else:
        port = grpc_server.add_secure_port(address, credentials)
    if port == 0:
        raise OSError(f"could not bind {address}")
    return DiffstackServer(settings, grpc_server, runtime, health_servicer, port), port


async def serve_async(
    settings: Settings,
    worker: EngineWorker | None = None,
    on_created: Callable[[DiffstackServer], None] | None = None,
) -> int:
    """Run the server until SIGTERM/SIGINT, then drain; returns the process exit status.
    ``worker`` and ``on_created`` let rank 0 of a context-parallel group bring its engine worker and
    watch its group."""
    server, _ = await create_server(settings, worker=worker)
    if on_created is not None:
        on_created(server)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = 0

    def on_signal(signum: int) -> None:
        nonlocal signals
        signals += 1
        log.info("signal", signal=signal.Signals(signum).name, count=signals)
        if signals == 1:
            stop.set()
        else:  # a second signal: stop the work now
            server.runtime.queue.abort(NotReady("the server is shutting down; retry on another replica"))

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    await server.start()
    waiting = asyncio.ensure_future(stop.wait())
    ready = asyncio.ensure_future(server.ready.wait())
    await asyncio.wait({waiting, ready}, return_when=asyncio.FIRST_COMPLETED)
    if server.engine_error is None:
        await waiting
    waiting.cancel()
    ready.cancel()
    await server.stop()
    status = 1 if server.engine_error is not None else 0
    if server.engine_stuck:
        # A plugin never returned on the device thread (it may hold an import lock or the GPU): the
        # process must end anyway, so it ends here, without the interpreter's orderly shutdown.
        log.warning("engine_thread_stuck_exiting", status=status)
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


def serve(settings: Settings, log_level: int = logging.INFO) -> int:
    """Configure logging, run the server until a signal, drain, and return the exit status."""
    configure_logging(settings.server.log_format, log_level)
    return asyncio.run(serve_async(settings))
