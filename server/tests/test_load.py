"""Load: 32 concurrent clients against a queue of 8, each call ends with an image or RESOURCE_EXHAUSTED."""

from __future__ import annotations

import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc

from diffstack_client import DiffstackClient, ServiceError
from diffstack_server.testing import WAIT_S, SpyEngine

CLIENTS = 32


def test_overload_is_refused_fast_and_nothing_is_lost(server: Any, spy: SpyEngine) -> None:
    spy.gate = threading.Event()  # hold the first batch so the queue surely fills
    queue = server.server.runtime.queue
    rejected = threading.Semaphore(0)

    def call(seed: int) -> int | str:
        with DiffstackClient(server.target, timeout=WAIT_S) as client:
            try:
                result = client.generate("a crowd", steps=2, seed=seed)
            except ServiceError as error:
                if error.code is grpc.StatusCode.RESOURCE_EXHAUSTED:
                    rejected.release()
                return error.code.name
            assert [image.seed for image in result.images] == [seed], "every answer is for its own request"
            return seed

    with ThreadPoolExecutor(CLIENTS) as pool:
        futures = [pool.submit(call, 1000 + i) for i in range(CLIENTS)]
        # Every call is either refused, queued or running before the gate opens (bounded wait).
        refusals = 0
        while refusals + queue.depth + queue.in_flight < CLIENTS:
            assert rejected.acquire(timeout=WAIT_S), "calls neither refused nor queued"
            refusals += 1
        spy.gate.set()
        outcomes = [future.result(timeout=WAIT_S) for future in futures]

    codes = Counter(o for o in outcomes if isinstance(o, str))
    served = sorted(o for o in outcomes if isinstance(o, int))
    assert set(codes) <= {"RESOURCE_EXHAUSTED"}, codes
    assert codes["RESOURCE_EXHAUSTED"] >= CLIENTS - 8 - 4  # queue 8 + one running batch of up to 4
    assert len(served) + codes["RESOURCE_EXHAUSTED"] == CLIENTS  # none hangs, none lost
    assert sorted(spy.served_seeds()) == served  # each accepted request ran exactly once
    assert sum(len(call) for call in spy.calls) == len(served)  # and nothing else ran

    with DiffstackClient(server.target, timeout=WAIT_S) as client:
        assert client.health() == "SERVING"
        stats = client.stats()
        assert (stats.queue_depth, stats.in_flight) == (0, 0)
        assert stats.requests_served == len(served)
        assert stats.requests_failed == codes["RESOURCE_EXHAUSTED"]
        assert client.generate("after the storm", steps=1).images
