"""Load is shed before work: a full queue refuses before validation and model loading, name checks never
wait behind the engine's device thread, and statuses at the edges (deadline, grace) are the right ones."""

from __future__ import annotations

import asyncio
import re
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import grpc
import pytest

from diffstack_client import DiffstackClient, Queued, ServiceError
from diffstack_server.interceptors import StatusInterceptor
from diffstack_server.metrics import Metrics
from diffstack_server.testing import WAIT_S, SpyEngine

GENERATE = 'method="/diffstack.v1.GenerationService/Generate"'


def hold_one_batch(client: DiffstackClient, spy: SpyEngine) -> Any:
    """Start a request and keep its batch inside the engine (the device thread busy) until the gate."""
    spy.gate = threading.Event()
    blocker = client.stream("a blocker", steps=1, seed=1)
    next(blocker)
    assert spy.entered.wait(WAIT_S)
    return blocker


def test_a_full_queue_refuses_before_validating_or_loading(start_server: Any, spy: SpyEngine) -> None:
    server = start_server(spy, server={"queue_size": 1})
    with DiffstackClient(server.target, timeout=WAIT_S) as client:
        blocker = hold_one_batch(client, spy)
        waiting = client.stream("fills the queue", steps=1, seed=2)
        assert next(waiting) == Queued(0)
        started = time.monotonic()
        # Invalid in every field and naming a model that would need loading: refused for the queue.
        with pytest.raises(ServiceError) as failure:
            client.generate("x" * 10_000, steps=10_000, width=7, model="no-such-model")
        assert failure.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert time.monotonic() - started < 2.0
        spy.gate.set()
        list(blocker), list(waiting)


def test_name_checks_and_preparation_do_not_wait_for_the_device_thread(server: Any, spy: SpyEngine) -> None:
    with DiffstackClient(server.target, timeout=WAIT_S) as client:
        blocker = hold_one_batch(client, spy)
        with pytest.raises(ServiceError) as failure:
            client.generate("a cube", steps=1, model="no-such-model")
        assert failure.value.code is grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(ServiceError) as failure:
            client.generate("a cube", steps=1, width=7)
        assert failure.value.code is grpc.StatusCode.INVALID_ARGUMENT
        # A valid request for the loaded model is prepared and queued while the batch still runs.
        queued = client.stream("queued behind", steps=1, seed=3)
        assert next(queued) == Queued(0)
        assert not spy.gate.is_set()
        spy.gate.set()
        list(blocker), list(queued)


def test_deadline_expiry_is_counted_as_deadline_exceeded(start_server: Any, spy: SpyEngine) -> None:
    server = start_server(spy, server={"metrics_port": 0})
    with DiffstackClient(server.target, timeout=WAIT_S) as client:
        blocker = hold_one_batch(client, spy)
        with pytest.raises(ServiceError) as failure:
            client.generate("too late", steps=1, seed=4, timeout=0.5)
        assert failure.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
        spy.gate.set()
        list(blocker)
    text = metrics_text(server.server.metrics_port)
    assert re.search(rf'diffstack_requests_total{{code="DEADLINE_EXCEEDED",{GENERATE}}} 1\.0', text)
    assert "CANCELLED" not in text


def test_grace_expiry_fails_what_is_left_with_unavailable(start_server: Any, spy: SpyEngine) -> None:
    server = start_server(spy)
    with DiffstackClient(server.target, timeout=WAIT_S) as client:
        spy.gate = threading.Event()
        outcomes: dict[str, BaseException] = {}

        def call(name: str, seed: int) -> None:
            try:
                client.generate(name, steps=2, seed=seed)
            except ServiceError as error:
                outcomes[name] = error

        running = threading.Thread(target=call, args=("running", 5))
        running.start()
        assert spy.entered.wait(WAIT_S)
        queued = threading.Thread(target=call, args=("queued", 6))
        queued.start()
        deadline = time.monotonic() + WAIT_S
        while server.server.runtime.queue.depth < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        stopping = server.submit(server.server.stop(grace=0.2))
        queued.join(WAIT_S)
        spy.gate.set()
        running.join(WAIT_S)
        stopping.result(WAIT_S)
    for name in ("running", "queued"):
        error = outcomes[name]
        assert isinstance(error, ServiceError) and error.code is grpc.StatusCode.UNAVAILABLE, (name, error)


def metrics_text(port: int | None, token: str | None = None) -> str:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    return urllib.request.urlopen(request, timeout=10).read().decode()


def test_metrics_can_require_the_admin_token(start_server: Any, spy: SpyEngine) -> None:
    server = start_server(
        spy, server={"metrics_port": 0, "admin_token": "s3cret", "metrics_require_token": True}
    )
    port = server.server.metrics_port
    with pytest.raises(urllib.error.HTTPError) as refused:
        metrics_text(port)
    assert refused.value.code == 401
    with pytest.raises(urllib.error.HTTPError):
        metrics_text(port, token="wrong")
    assert "diffstack_requests_total" in metrics_text(port, token="s3cret")


def test_metrics_listen_on_loopback_by_default(start_server: Any, spy: SpyEngine) -> None:
    server = start_server(spy, server={"metrics_port": 0, "host": "0.0.0.0"})
    http = server.server.runtime.metrics._http
    assert http is not None and http.server_address[0] == "127.0.0.1"


def test_metrics_token_needs_an_admin_token(start_server: Any, spy: SpyEngine) -> None:
    with pytest.raises(ValueError, match="admin_token"):
        start_server(spy, server={"metrics_port": 0, "metrics_require_token": True})


def test_reflection_can_be_turned_off(start_server: Any, spy: SpyEngine) -> None:
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    server = start_server(spy, server={"reflection": False})
    with grpc.insecure_channel(server.target) as channel:
        with pytest.raises(grpc.RpcError) as failure:
            ProtoReflectionDescriptorDatabase(channel).get_services()
        assert failure.value.code() is grpc.StatusCode.UNIMPLEMENTED


@pytest.mark.parametrize(
    ("remaining", "label"), [(0.01, "DEADLINE_EXCEEDED"), (-1.0, "DEADLINE_EXCEEDED"), (5.0, "CANCELLED")]
)
def test_a_cancel_at_the_deadline_is_labelled_deadline_exceeded(remaining: float, label: str) -> None:
    """The client's timer may end the call a few milliseconds before the server's copy of the deadline."""

    class Context:
        def time_remaining(self) -> float:
            return remaining

    outcome = ["OK"]
    asyncio.run(StatusInterceptor(Metrics())._fail(asyncio.CancelledError(), Context(), outcome, print))  # type: ignore[arg-type]
    assert outcome == [label]
