"""Two Ray Serve replicas of the tiny model behind one gRPC port, on loopback, in a private Ray.

One module-scoped deployment (Ray's start costs seconds): Generate, GenerateStream, ListPlugins,
health, statuses with details, which replica answered, stats added up, and a killed replica replaced
with every request answered once or refused with a status.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from diffstack.config import Settings
from diffstack.testing import baseline_settings
from diffstack_client.v1 import (
    diagnostics_pb2,
    diagnostics_pb2_grpc,
    generation_pb2,
    generation_pb2_grpc,
    types_pb2,
)

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from diffstack_ray.launch import start_replicas  # noqa: E402
from diffstack_ray.replica import REPLICA_HEADER  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]
WAIT_S = 60.0
QUEUE = 2
"""Each replica's queue (images) and Ray's limits on it: small, so a burst meets backpressure."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def port(models_dir: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    chosen = _free_port()
    settings: Settings = baseline_settings(
        models_dir,
        "tiny-sd1",
        server={
            "port": chosen,
            "batch_size": 2,
            "warm_batches": False,
            "batch_wait_ms": 0,
            "metrics": False,
            "queue_size": QUEUE,
        },
    )
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        _temp_dir=str(tmp_path_factory.mktemp("ray")),
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
    )
    try:
        start_replicas(settings, 2)
        yield chosen
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture
def channel(port: int) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        grpc.channel_ready_future(channel).result(timeout=WAIT_S)
        yield channel


def _spec(seed: int, **fields: Any) -> types_pb2.GenerationSpec:
    values: dict[str, Any] = {"prompt": "a red square", "steps": 2, "width": 64, "height": 64, **fields}
    return types_pb2.GenerationSpec(seeds=[seed], **values)


def _replica(call: Any) -> str:
    return dict(call.trailing_metadata())[REPLICA_HEADER]


def test_generate_stream_and_plugins_through_two_replicas(channel: grpc.Channel) -> None:
    generation = generation_pb2_grpc.GenerationServiceStub(channel)

    def generate(seed: int) -> str:
        response, call = generation.Generate.with_call(
            generation_pb2.GenerateRequest(spec=_spec(seed)), timeout=WAIT_S
        )
        assert len(response.result.images) == 1
        return _replica(call)

    # Ray routes each call to the less busy of two sampled replicas, so calls made one after another
    # may all meet the same idle replica: concurrent rounds keep one busy while the next call routes.
    answered_by: set[str] = set()
    with ThreadPoolExecutor(max_workers=2) as pool:  # two at a time: within the fixture's queues
        for round_ in range(8):
            answered_by.update(pool.map(generate, (2 * round_, 2 * round_ + 1)))
            if len(answered_by) == 2:
                break
    assert len(answered_by) == 2, "both replicas answer behind the one port"
    events = list(
        generation.GenerateStream(generation_pb2.GenerateStreamRequest(spec=_spec(7)), timeout=WAIT_S)
    )
    assert events[-1].HasField("result") and len(events[-1].result.images) == 1
    assert any(e.HasField("progress") for e in events)
    plugins = diagnostics_pb2_grpc.DiagnosticsServiceStub(channel).ListPlugins(
        diagnostics_pb2.ListPluginsRequest(), timeout=WAIT_S
    )
    assert {"sdpa", "schedules"} <= {p.name for p in plugins.plugins}


def test_invalid_request_has_details_not_a_traceback(channel: grpc.Channel) -> None:
    generation = generation_pb2_grpc.GenerationServiceStub(channel)
    with pytest.raises(grpc.RpcError) as caught:
        generation.Generate(generation_pb2.GenerateRequest(spec=_spec(1, steps=100000)), timeout=WAIT_S)
    error: Any = caught.value
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "Traceback" not in error.details()
    status = rpc_status.from_call(error)
    assert status is not None
    bad = [d for d in status.details if d.Is(error_details_pb2.BadRequest.DESCRIPTOR)]
    request = error_details_pb2.BadRequest()
    bad[0].Unpack(request)
    assert any(v.field.endswith("steps") for v in request.field_violations)


def test_health_and_reflection(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "diffstack.v1.GenerationService"):
        answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=WAIT_S)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as caught:
        health.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=WAIT_S)
    assert caught.value.code() is grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    answers = reflection.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    names = {s.name for a in answers for s in a.list_services_response.service}
    assert "diffstack.v1.GenerationService" in names


def test_a_burst_beyond_the_queues_is_refused_with_resource_exhausted(channel: grpc.Channel) -> None:
    generation = generation_pb2_grpc.GenerationServiceStub(channel)
    calls = 8 * QUEUE * 2
    start = threading.Barrier(calls)

    def generate(seed: int) -> str:
        start.wait(WAIT_S)
        try:
            generation.Generate(generation_pb2.GenerateRequest(spec=_spec(seed, steps=8)), timeout=WAIT_S)
        except grpc.RpcError as error:
            code: Any = error.code()  # type: ignore[attr-defined]
            return str(code.name)
        return "OK"

    with ThreadPoolExecutor(calls) as pool:
        codes = list(pool.map(generate, range(calls)))
    assert set(codes) == {"OK", "RESOURCE_EXHAUSTED"}, codes


def test_stats_add_up_the_replicas(channel: grpc.Channel) -> None:
    generation = generation_pb2_grpc.GenerationServiceStub(channel)
    for seed in range(4):
        generation.Generate(generation_pb2.GenerateRequest(spec=_spec(seed)), timeout=WAIT_S)
    stats = diagnostics_pb2_grpc.DiagnosticsServiceStub(channel).GetStats(
        diagnostics_pb2.GetStatsRequest(), timeout=WAIT_S
    )
    assert stats.engine["replicas"] == 2, "both replicas posted their stats at start"
    assert stats.requests_served >= 1


def test_killed_replica_is_replaced_and_nothing_is_answered_twice(channel: grpc.Channel, port: int) -> None:
    generation = generation_pb2_grpc.GenerationServiceStub(channel)
    _, call = generation.Generate.with_call(generation_pb2.GenerateRequest(spec=_spec(100)), timeout=WAIT_S)
    victim = _replica(call)
    actors = [a for a in ray.util.list_named_actors(all_namespaces=True) if victim in a["name"]]
    assert actors, victim
    ray.kill(ray.get_actor(actors[0]["name"], namespace=actors[0]["namespace"]), no_restart=True)

    def generate(seed: int) -> tuple[int, str]:
        try:
            response = generation.Generate(generation_pb2.GenerateRequest(spec=_spec(seed)), timeout=WAIT_S)
        except grpc.RpcError as error:
            code: Any = error.code()  # type: ignore[attr-defined]
            return seed, code.name
        assert [image.seed for image in response.result.images] == [seed]
        return seed, "OK"

    with ThreadPoolExecutor(4) as pool:
        outcomes = list(pool.map(generate, range(200, 212)))
    assert sorted(seed for seed, _ in outcomes) == list(range(200, 212)), "each request answered once"
    assert {code for _, code in outcomes} <= {"OK", "UNAVAILABLE", "INTERNAL", "RESOURCE_EXHAUSTED"}
    assert any(code == "OK" for _, code in outcomes)
    replaced = _wait_for(lambda: _answering_replicas(generation) - {victim})
    assert len(replaced) == 2, "a new replica took the killed one's place"


def _answering_replicas(generation: Any) -> set[str]:
    names = set()
    for seed in range(6):
        _, call = generation.Generate.with_call(
            generation_pb2.GenerateRequest(spec=_spec(seed)), timeout=WAIT_S
        )
        names.add(_replica(call))
    return names


def _wait_for(found: Callable[[], set[str]]) -> set[str]:
    import time

    give_up = time.monotonic() + WAIT_S
    while True:
        names = found()
        if len(names) == 2 or time.monotonic() > give_up:
            return names
        time.sleep(0.5)


def test_settings_the_replicas_cannot_honour_are_refused(models_dir: Any) -> None:
    from diffstack_ray.launch import unsupported

    plain = baseline_settings(models_dir, "tiny-sd1")
    assert unsupported(plain) == []
    guarded = baseline_settings(models_dir, "tiny-sd1", server={"admin_token": "t", "tls_cert": "/c"})
    assert unsupported(guarded) == ["server.admin_token", "server TLS"]
    with pytest.raises(ValueError, match="admin_token"):
        start_replicas(guarded, 2)
