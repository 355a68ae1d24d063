"""Cancel and deadline: the work stops within one step, and the next request is served normally."""

from __future__ import annotations

import threading
from typing import Any

import grpc
import pytest

from diffstack.errors import Cancelled, DeadlineExceeded
from diffstack_client import DiffstackClient, Progress, Queued, ServiceError
from diffstack_server.testing import WAIT_S, SpyEngine

STEPS = 40


def test_cancel_stops_the_work_within_one_step(server: Any, spy: SpyEngine) -> None:
    spy.hold_first_step = True
    with DiffstackClient(server.target, timeout=WAIT_S) as client:
        events = client.stream("a long job", steps=STEPS, seed=500)
        for event in events:
            if isinstance(event, Progress):
                break
        events.close()  # cancels the RPC; the server marks the job, the engine sees it at the next step
        spy.hold_first_step = False
        assert client.generate("the next one", steps=2, seed=501).images[0].seed == 501
    record = spy.jobs[500]
    assert isinstance(record.outcome, Cancelled)
    assert (
        record.stopped_at_callback is not None and record.stopped_at_callback <= 2
    )  # step 1 held, step 2 stops
    assert record.callbacks < STEPS


def test_deadline_stops_the_work_within_one_step(server: Any, spy: SpyEngine) -> None:
    spy.hold_first_step = True
    with DiffstackClient(server.target) as client:
        with pytest.raises(ServiceError) as failure:
            client.generate("a slow job", steps=STEPS, seed=600, timeout=1.0)
        assert failure.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
        spy.hold_first_step = False
        assert client.generate("the next one", steps=2, seed=601, timeout=WAIT_S).images
    record = spy.jobs[600]
    assert isinstance(record.outcome, DeadlineExceeded)
    assert record.stopped_at_callback is not None and record.stopped_at_callback <= 2
    assert record.callbacks < STEPS


def test_cancelled_while_queued_never_runs(server: Any, spy: SpyEngine) -> None:
    spy.gate = threading.Event()
    with DiffstackClient(server.target, timeout=WAIT_S) as client:
        blocker = client.stream("a blocker", steps=1, seed=1)
        next(blocker)
        assert spy.entered.wait(WAIT_S)
        waiting = client.stream("never mind", steps=2, seed=700)
        assert next(waiting) == Queued(0)
        waiting.close()
        behind = client.stream("behind it", steps=2, seed=800)
        first = next(behind)
        spy.gate.set()
        list(blocker)
        rest = list(behind)
    assert first in (Queued(0), Queued(1))
    assert rest[-1].result.images[0].seed == 800  # type: ignore[union-attr]
    assert 700 not in {seeds[0] for call in spy.calls for seeds in call}


def test_expired_while_queued_never_runs(server: Any, spy: SpyEngine) -> None:
    spy.gate = threading.Event()
    with DiffstackClient(server.target, timeout=WAIT_S) as client:
        blocker = client.stream("a blocker", steps=1, seed=1)
        next(blocker)
        assert spy.entered.wait(WAIT_S)
        late = client.stream("too late", steps=2, seed=900, timeout=0.5)
        assert next(late) == Queued(0)
        with pytest.raises(ServiceError) as failure:
            list(late)  # the deadline passes while the request waits behind the gate
        assert failure.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
        spy.gate.set()
        list(blocker)
        assert client.generate("next", steps=1, seed=901).images
    assert 900 not in {seeds[0] for call in spy.calls for seeds in call}
