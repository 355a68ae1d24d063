"""Jobs: SubmitJob, WatchJob, CancelJob, ListJobs against a real server and the real engine."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import grpc
import pytest

from diffstack_client import AsyncDiffstackClient, DiffstackClient, Finished, Progress, Queued, ServiceError
from diffstack_client.v1 import generation_pb2
from diffstack_server.testing import WAIT_S, SpyEngine

KEY_A = "job-key-a-0123456789abc"
KEY_B = "job-key-b-0123456789abc"


def run_job_checks(client: DiffstackClient, spy: SpyEngine) -> None:
    job_id = client.submit_job("a cube", steps=2, seed=5, idempotency_key="once")
    events = list(client.watch_job(job_id))
    assert isinstance(events[0], Queued) and isinstance(events[-1], Finished)
    assert [e.step for e in events if isinstance(e, Progress)] == [1, 2]
    assert events[-1].result.images[0].seed == 5
    again = list(client.watch_job(job_id))  # a second watcher gets the whole story again
    assert [type(e) for e in again] == [type(e) for e in events]
    assert list(client.watch_job(job_id, from_now=True)) == []  # ended: nothing new comes
    assert client.submit_job("a cube", steps=2, seed=5, idempotency_key="once") == job_id
    assert spy.served_seeds().count(5) == 1  # the same key never runs twice
    (info,) = [j for j in client.list_jobs() if j.job_id == job_id]
    assert info.state == generation_pb2.JOB_STATE_SUCCEEDED and info.idempotency_key == "once"


def test_submit_job(client: DiffstackClient, spy: SpyEngine) -> None:
    run_job_checks(client, spy)
    with pytest.raises(ServiceError) as refused:
        client.submit_job("a cube", steps=1, width=7)
    assert refused.value.code is grpc.StatusCode.INVALID_ARGUMENT and "spec.width" in refused.value.violations
    with pytest.raises(ServiceError) as long_key:
        client.submit_job("a cube", steps=1, idempotency_key="k" * 200)
    assert "idempotency_key" in long_key.value.violations


def test_watch_job(client: DiffstackClient, spy: SpyEngine) -> None:
    """A watcher that drops off loses nothing: the job runs on, and a new watcher sees every event."""
    spy.gate = threading.Event()
    job_id = client.submit_job("a cube", steps=2, seed=8)
    stream = client.watch_job(job_id)
    assert isinstance(next(stream), Queued)
    stream.close()  # the connection drops
    assert spy.entered.wait(WAIT_S)
    spy.gate.set()
    events = list(client.watch_job(job_id))
    assert isinstance(events[-1], Finished) and events[-1].result.images[0].seed == 8
    with pytest.raises(ServiceError) as unknown:
        list(client.watch_job("no-such-job"))
    assert unknown.value.code is grpc.StatusCode.NOT_FOUND


def test_cancel_job(client: DiffstackClient, spy: SpyEngine) -> None:
    spy.gate = threading.Event()
    running = client.submit_job("a cube", steps=2, seed=1)
    assert spy.entered.wait(WAIT_S)
    queued = client.submit_job("a sphere", steps=3, seed=2)  # another batch key: waits in the queue
    assert client.cancel_job(queued) == "JOB_STATE_CANCELLED"
    spy.gate.set()
    with pytest.raises(ServiceError) as cancelled:
        list(client.watch_job(queued))
    assert cancelled.value.code is grpc.StatusCode.CANCELLED
    assert isinstance(list(client.watch_job(running))[-1], Finished)
    assert client.cancel_job(running) == "JOB_STATE_SUCCEEDED"  # an ended job keeps its state
    assert 2 not in spy.served_seeds()


def test_async_client_jobs(server: Any, spy: SpyEngine) -> None:
    """The asyncio client's job methods do what the blocking client's do, against the same server."""

    async def main() -> None:
        async with AsyncDiffstackClient(server.target, timeout=WAIT_S) as client:
            job_id = await client.submit_job("a cube", steps=2, seed=5, idempotency_key="once")
            events = [event async for event in client.watch_job(job_id)]
            assert isinstance(events[0], Queued) and isinstance(events[-1], Finished)
            assert [e.step for e in events if isinstance(e, Progress)] == [1, 2]
            assert events[-1].result.images[0].seed == 5
            assert [event async for event in client.watch_job(job_id, from_now=True)] == []
            assert await client.submit_job("a cube", steps=2, seed=5, idempotency_key="once") == job_id
            (info,) = [j for j in await client.list_jobs() if j.job_id == job_id]
            assert info.state == generation_pb2.JOB_STATE_SUCCEEDED and info.idempotency_key == "once"
            assert await client.cancel_job(job_id) == "JOB_STATE_SUCCEEDED"
            spy.gate = threading.Event()
            running = await client.submit_job("a cube", steps=2, seed=1)
            assert await asyncio.to_thread(spy.entered.wait, WAIT_S)
            queued = await client.submit_job("a sphere", steps=3, seed=2)
            assert await client.cancel_job(queued) == "JOB_STATE_CANCELLED"
            spy.gate.set()
            with pytest.raises(ServiceError) as cancelled:
                [event async for event in client.watch_job(queued)]
            assert cancelled.value.code is grpc.StatusCode.CANCELLED
            assert isinstance([event async for event in client.watch_job(running)][-1], Finished)
            with pytest.raises(ServiceError) as unknown:
                await client.cancel_job("no-such-job")
            assert unknown.value.code is grpc.StatusCode.NOT_FOUND

    asyncio.run(main())
    assert spy.served_seeds().count(5) == 1 and 2 not in spy.served_seeds()


def test_list_jobs(client: DiffstackClient, spy: SpyEngine) -> None:
    spy.gate = threading.Event()
    first = client.submit_job("a cube", steps=2, seed=1)
    assert spy.entered.wait(WAIT_S)
    second = client.submit_job("a sphere", steps=3, seed=2)
    third = client.submit_job("a cone", steps=4, seed=3)
    jobs = {job.job_id: job for job in client.list_jobs()}
    assert jobs[second].state == generation_pb2.JOB_STATE_QUEUED and jobs[second].position == 0
    assert jobs[third].position == 1
    spy.gate.set()
    for job_id in (first, second, third):
        list(client.watch_job(job_id))
    assert all(job.state == generation_pb2.JOB_STATE_SUCCEEDED for job in client.list_jobs())


def test_jobs_are_scoped_by_api_key(start_server: Any, spy: SpyEngine) -> None:
    keys = [{"label": "a", "key": KEY_A}, {"label": "b", "key": KEY_B}]
    server = start_server(spy, server={"api_keys": keys})
    with (
        DiffstackClient(server.target, timeout=WAIT_S, api_key=KEY_A) as a,
        DiffstackClient(server.target, timeout=WAIT_S, api_key=KEY_B) as b,
    ):
        job_a = a.submit_job("a cube", steps=1, seed=1, idempotency_key="same")
        job_b = b.submit_job("a cube", steps=1, seed=2, idempotency_key="same")
        assert job_a != job_b  # one key, two callers: two jobs
        assert [j.job_id for j in a.list_jobs()] == [job_a]
        with pytest.raises(ServiceError) as hidden:
            list(b.watch_job(job_a))
        assert hidden.value.code is grpc.StatusCode.NOT_FOUND
        assert isinstance(list(a.watch_job(job_a))[-1], Finished)


def test_finished_jobs_are_kept_within_the_memory_budget(start_server: Any, spy: SpyEngine) -> None:
    server = start_server(spy, server={"jobs_keep_bytes": 0})
    with DiffstackClient(server.target, timeout=WAIT_S) as client:
        job_id = client.submit_job("a cube", steps=1, seed=1, idempotency_key="k")
        assert client.wait_until_serving(WAIT_S) is None
        for _ in range(200):
            if not client.list_jobs():
                break
            threading.Event().wait(0.01)
        assert client.list_jobs() == []
        with pytest.raises(ServiceError) as gone:
            list(client.watch_job(job_id))
        assert gone.value.code is grpc.StatusCode.NOT_FOUND
        assert client.submit_job("a cube", steps=1, seed=1, idempotency_key="k") != job_id
