"""A server on its own thread and event loop, for tests, benchmarks and notebooks.

    with BackgroundServer(settings, engine) as server:
        client = DiffstackClient(server.target)

It runs exactly what ``serve`` runs (:func:`create_server`), minus the signal handlers. All
background servers of a process share one long-lived event loop thread: grpc.aio binds its completion
queue to the loops it runs on, and closing a loop under it leaves a dangling reader behind.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, TypeVar

from diffstack_server.app import DiffstackServer, create_server

if TYPE_CHECKING:
    from types import TracebackType

    from diffstack.config import Settings
    from diffstack_server.protocols import ServingEngine

T = TypeVar("T")

_shared_loop: asyncio.AbstractEventLoop | None = None
_shared_lock = threading.Lock()


def background_loop() -> asyncio.AbstractEventLoop:
    """The process's background event loop (started on first use, runs until the process ends)."""
    global _shared_loop
    with _shared_lock:
        if _shared_loop is None:
            _shared_loop = asyncio.new_event_loop()
            threading.Thread(
                target=_shared_loop.run_forever, name="diffstack-server-loop", daemon=True
            ).start()
        return _shared_loop


class BackgroundServer:
    """Runs :func:`create_server` on the background event loop thread."""

    def __init__(self, settings: Settings, engine: ServingEngine | None = None) -> None:
        self.settings = settings
        self._engine = engine
        self._loop = background_loop()
        self.server: DiffstackServer | None = None
        self.port = 0

    @property
    def target(self) -> str:
        """``host:port`` for a client channel."""
        host = self.settings.server.host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    def call(self, coroutine: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coroutine`` on the server's loop and wait for its result."""
        return self.submit(coroutine).result(timeout)

    def submit(self, coroutine: Coroutine[Any, Any, T]) -> Future[T]:
        """Schedule ``coroutine`` on the server's loop without waiting."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop)

    def start(self, ready_timeout: float | None = 120.0) -> BackgroundServer:
        """Start the server; with ``ready_timeout`` also wait for the engine."""

        async def build() -> DiffstackServer:
            server, self.port = await create_server(self.settings, self._engine)
            await server.start()
            return server

        self.server = self.call(build())
        if ready_timeout is not None:
            self.call(self.server.wait_ready(ready_timeout))
        return self

    def stop(self, grace: float | None = 0.0) -> None:
        """Drain the server within ``grace`` seconds (the loop thread stays for the next server)."""
        if self.server is not None:
            self.call(self.server.stop(grace))
            self.server = None

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
