"""grpc.health.v1 through start-up and draining, server reflection, and in-process graceful stop."""

from __future__ import annotations

import threading
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from diffstack.engine import Engine
from diffstack.testing import BASELINE_PLUGINS
from diffstack_client import DiffstackClient, Finished, PluginStatus, Progress, ServiceError
from diffstack_server.testing import WAIT_S, SpyEngine

SERVICES = ("", "diffstack.v1.GenerationService", "diffstack.v1.DiagnosticsService")


def wait_for_status(target: str, wanted: str) -> None:
    """Watch the server's overall health until it reports ``wanted`` (bounded by WAIT_S)."""
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for update in stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=WAIT_S):
            if health_pb2.HealthCheckResponse.ServingStatus.Name(update.status) == wanted:
                return


def statuses(target: str) -> set[str]:
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return {
            health_pb2.HealthCheckResponse.ServingStatus.Name(
                stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=WAIT_S).status
            )
            for service in SERVICES
        }


def test_health_not_serving_until_the_engine_is_up(
    start_server: Any, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    release, composing = threading.Event(), threading.Event()

    def slow_start(settings: Any, host: Any = None) -> Engine:
        composing.set()  # the plugins have loaded; the models would compose now
        assert release.wait(WAIT_S)
        return engine

    monkeypatch.setattr(Engine, "start", staticmethod(slow_start))
    server = start_server(None, ready=False)
    with DiffstackClient(server.target, timeout=WAIT_S) as client:
        assert statuses(server.target) == {"NOT_SERVING"}
        with pytest.raises(ServiceError) as failure:
            client.generate("a cube", steps=1)
        assert failure.value.code is grpc.StatusCode.UNAVAILABLE
        assert failure.value.reason == "NOT_READY"
        with pytest.raises(ServiceError) as failure:
            client.stack()
        assert failure.value.code is grpc.StatusCode.UNAVAILABLE
        # The plugins loaded before the model started composing: diagnostics can already list them.
        assert composing.wait(WAIT_S)
        loaded = {p.name for p in client.plugins() if p.status is PluginStatus.LOADED}
        assert loaded == set(BASELINE_PLUGINS)

        release.set()
        client.wait_until_serving(timeout=WAIT_S)
        assert statuses(server.target) == {"SERVING"}
        assert client.generate("a cube", steps=1).images


def test_engine_start_failure_keeps_health_not_serving(
    start_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_start(settings: Any, host: Any = None) -> Engine:
        raise RuntimeError("no model")

    monkeypatch.setattr(Engine, "start", staticmethod(broken_start))
    server = start_server(None, ready=False)
    with pytest.raises(RuntimeError, match="engine failed to start"):
        server.call(server.server.wait_ready(WAIT_S))
    assert statuses(server.target) == {"NOT_SERVING"}


def test_drain_finishes_running_work_and_refuses_new(start_server: Any, spy: SpyEngine) -> None:
    spy.gate = threading.Event()
    server = start_server(spy)
    with DiffstackClient(server.target, timeout=WAIT_S) as client:
        events = client.stream("a cube", steps=2, seed=77)
        next(events)  # queued
        assert spy.entered.wait(WAIT_S)  # the request is inside engine.run, held at the gate
        stopping = server.submit(server.server.stop(grace=WAIT_S))
        wait_for_status(server.target, "NOT_SERVING")
        assert statuses(server.target) == {"NOT_SERVING"}
        with pytest.raises(ServiceError) as failure:
            client.generate("another cube", steps=1)
        assert failure.value.code is grpc.StatusCode.UNAVAILABLE

        spy.gate.set()
        rest = list(events)
        assert [e for e in rest if isinstance(e, Progress)][-1] == Progress(2, 2)
        assert isinstance(rest[-1], Finished) and rest[-1].result.images[0].seed == 77
        stopping.result(WAIT_S)


def test_reflection_lists_the_services(server: Any) -> None:
    with grpc.insecure_channel(server.target) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        assert services == {
            "diffstack.v1.GenerationService",
            "diffstack.v1.DiagnosticsService",
            "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection",
        }
        generation = database.FindFileContainingSymbol("diffstack.v1.GenerationService")
        assert generation.name == "diffstack/v1/generation.proto"
        assert "diffstack/v1/types.proto" in generation.dependency
