"""Prometheus metrics and the live numbers behind ``GetStats``.

Each server owns its own :class:`~prometheus_client.CollectorRegistry`, so several servers can live in
one process (tests, benchmarks) without clashing over the global registry.
"""

from __future__ import annotations

import hmac
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app

if TYPE_CHECKING:
    from collections.abc import Iterable
    from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

GENERATION_METHODS = frozenset(
    {"/diffstack.v1.GenerationService/Generate", "/diffstack.v1.GenerationService/GenerateStream"}
)
_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)
_LATENCY_WINDOW = 1024


@dataclass(frozen=True)
class Percentiles:
    """Latency percentiles over the recent window, in seconds."""

    p50: float
    p90: float
    p99: float
    count: int


class Metrics:
    """The server's counters: exported to Prometheus and summarised for ``GetStats``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.started_at = time.monotonic()
        self.requests = Counter(
            "diffstack_requests",
            "RPCs answered, by method and status code.",
            ["method", "code"],
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "diffstack_request_seconds",
            "End-to-end time of generation RPCs (queue, compute and encoding).",
            ["method"],
            buckets=_SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.queue_seconds = Histogram(
            "diffstack_queue_seconds",
            "Time a generation request waited in the queue before its batch started.",
            buckets=_SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.compute_seconds = Histogram(
            "diffstack_compute_seconds",
            "Wall time of one pipeline call (one batch).",
            buckets=_SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.batch_images = Histogram(
            "diffstack_batch_images",
            "Images per pipeline call.",
            buckets=_BATCH_BUCKETS,
            registry=self.registry,
        )
        self.batch_requests = Histogram(
            "diffstack_batch_requests",
            "Requests per pipeline call.",
            buckets=_BATCH_BUCKETS,
            registry=self.registry,
        )
        self.images_served = Counter(
            "diffstack_images_served", "Images returned to clients.", registry=self.registry
        )
        self.queue_depth = Gauge(
            "diffstack_queue_depth", "Requests waiting in the queue.", registry=self.registry
        )
        self.in_flight = Gauge("diffstack_in_flight", "Requests being generated now.", registry=self.registry)
        self._lock = threading.Lock()
        self._latencies: deque[float] = deque(maxlen=_LATENCY_WINDOW)
        self.served = 0
        self.failed = 0
        self.images = 0
        self.batches = 0
        self._http: WSGIServer | None = None

    # -- recording ---------------------------------------------------------------------------------

    def observe_rpc(self, method: str, code: str, seconds: float) -> None:
        """Count one finished RPC; generation RPCs also feed the served/failed counts and latency."""
        self.requests.labels(method=method, code=code).inc()
        if method not in GENERATION_METHODS:
            return
        self.request_seconds.labels(method=method).observe(seconds)
        with self._lock:
            if code == "OK":
                self.served += 1
                self._latencies.append(seconds)
            else:
                self.failed += 1

    def observe_batch(self, requests: int, images: int, seconds: float) -> None:
        """Record one pipeline call."""
        self.batch_requests.observe(requests)
        self.batch_images.observe(images)
        self.compute_seconds.observe(seconds)
        with self._lock:
            self.batches += 1

    def observe_images(self, count: int) -> None:
        self.images_served.inc(count)
        with self._lock:
            self.images += count

    # -- reading -------------------------------------------------------------------------------------

    def latency(self) -> Percentiles:
        with self._lock:
            values = sorted(self._latencies)
        if not values:
            return Percentiles(0.0, 0.0, 0.0, 0)

        def at(q: float) -> float:
            return values[min(len(values) - 1, round(q * (len(values) - 1)))]

        return Percentiles(at(0.5), at(0.9), at(0.99), len(values))

    @property
    def uptime_s(self) -> float:
        return time.monotonic() - self.started_at

    # -- exposition ---------------------------------------------------------------------------------

    def serve_http(self, host: str, port: int, token: str | None = None) -> int:
        """Expose ``/metrics`` on ``host:port`` (0 picks a free port); returns the bound port.

        With ``token``, a scrape must send ``Authorization: Bearer <token>`` (Prometheus:
        ``authorization: {credentials: ...}``); others get 401.
        """
        app = make_wsgi_app(self.registry)
        if token is not None:
            app = _bearer_required(app, token)
        server_class = _ThreadingIPv6Server if ":" in host else _ThreadingServer
        self._http = make_server(host, port, app, server_class, handler_class=_QuietHandler)
        threading.Thread(target=self._http.serve_forever, name="diffstack-metrics", daemon=True).start()
        return int(self._http.server_port)

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _ThreadingIPv6Server(_ThreadingServer):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        """Scrapes are not logged: one line per scrape would drown the server's own log."""


def _bearer_required(app: WSGIApplication, token: str) -> WSGIApplication:
    expected = f"Bearer {token}".encode()

    def checked(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        given = str(environ.get("HTTP_AUTHORIZATION", "")).encode()
        if not hmac.compare_digest(given, expected):
            start_response(
                "401 Unauthorized",
                [("Content-Type", "text/plain"), ("WWW-Authenticate", 'Bearer realm="diffstack"')],
            )
            return [b"/metrics needs the admin token: send 'Authorization: Bearer <token>'\n"]
        return app(environ, start_response)

    return checked
