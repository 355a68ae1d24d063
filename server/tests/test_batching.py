"""Dynamic batching on the real engine: compatible requests share a pipeline call, seeds reproduce."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import numpy as np
import pytest

from diffstack_client import DiffstackClient, Event, Finished, Queued, ServiceError
from diffstack_server.testing import WAIT_S, SpyEngine

STEPS = 3


def queued_streams(client: DiffstackClient, seeds: list[int], **params: Any) -> list[Iterator[Event]]:
    """Open one stream per seed and return once each reports that it is queued."""
    streams: list[Iterator[Event]] = []
    for seed in seeds:
        stream = client.stream(
            "a green cone", seed=seed, image_format="raw_rgb", **{"steps": STEPS, **params}
        )
        assert isinstance(next(stream), Queued)
        streams.append(stream)
    return streams


def finish(streams: list[Iterator[Event]]) -> list[Finished]:
    """Read every stream to its end (in parallel) and return each one's final event."""

    def last(stream: Iterator[Event]) -> Finished:
        final = list(stream)[-1]
        assert isinstance(final, Finished)
        return final

    with ThreadPoolExecutor(len(streams)) as pool:
        return list(pool.map(last, streams))


def pixels(result: Finished) -> np.ndarray:
    return np.asarray(result.result.images[0].to_pil(), dtype=np.int16)


def test_compatible_requests_share_one_pipeline_call(server: Any, spy: SpyEngine) -> None:
    spy.gate = threading.Event()
    seeds = [101, 102, 103, 104]
    with DiffstackClient(server.target, timeout=WAIT_S) as client:
        blocker = client.stream("a blocker", seed=1, steps=1)
        next(blocker)
        assert spy.entered.wait(WAIT_S)  # the worker is busy: the next requests wait together
        streams = queued_streams(client, seeds)
        spy.gate.set()
        assert isinstance(list(blocker)[-1], Finished)
        batched = finish(streams)
        assert [r.result.images[0].seed for r in batched] == seeds
        assert spy.calls == [[(1,)], [(s,) for s in seeds]]  # 5 requests, 2 pipeline calls

        spy.gate = None
        alone = [client.generate("a green cone", seed=s, steps=STEPS, image_format="raw_rgb") for s in seeds]
    for together, single in zip(batched, alone, strict=True):
        difference = np.abs(pixels(together) - np.asarray(single.images[0].to_pil(), dtype=np.int16))
        assert difference.max() <= 2, "an image must be the same picture alone or inside a batch"
    assert len({pixels(r).tobytes() for r in batched}) == len(seeds), "different seeds, different images"


def test_batches_respect_max_batch_images_and_keys(server: Any, spy: SpyEngine) -> None:
    spy.gate = threading.Event()
    with DiffstackClient(server.target, timeout=WAIT_S) as client:
        blocker = client.stream("a blocker", seed=1, steps=1)
        next(blocker)
        assert spy.entered.wait(WAIT_S)
        streams = queued_streams(client, [10, 20, 30], num_images=2)  # 6 images, max_batch is 4
        streams += queued_streams(client, [40], steps=2)  # another batch key: never mixed in
        spy.gate.set()
        list(blocker)
        results = finish(streams)
    assert [[i.seed for i in r.result.images] for r in results] == [[10, 11], [20, 21], [30, 31], [40]]
    assert spy.calls[1:] == [[(10, 11), (20, 21)], [(30, 31)], [(40,)]]


def test_out_of_memory_batch_is_split_once_and_retried(server: Any, spy: SpyEngine) -> None:
    spy.gate = threading.Event()
    spy.oom_above = 2
    with DiffstackClient(server.target, timeout=WAIT_S) as client:
        blocker = client.stream("a blocker", seed=1, steps=1)
        next(blocker)
        assert spy.entered.wait(WAIT_S)
        streams = queued_streams(client, [1, 2, 3, 4])
        spy.gate.set()
        list(blocker)
        results = finish(streams)
    assert [r.result.images[0].seed for r in results] == [1, 2, 3, 4]
    assert spy.calls[1:] == [[(1,), (2,), (3,), (4,)], [(1,), (2,)], [(3,), (4,)]]


def test_out_of_memory_twice_gives_resource_exhausted(server: Any, spy: SpyEngine) -> None:
    spy.gate = threading.Event()
    spy.oom_above = 0
    with DiffstackClient(server.target, timeout=WAIT_S) as client:
        blocker = client.stream("a blocker", seed=1, steps=1)
        next(blocker)
        assert spy.entered.wait(WAIT_S)
        streams = queued_streams(client, [1, 2])
        spy.gate.set()
        with pytest.raises(ServiceError):
            list(blocker)  # a batch of one that does not fit is not split further
        for stream in streams:
            with pytest.raises(ServiceError) as failure:
                list(stream)
            assert failure.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert failure.value.reason == "OUT_OF_MEMORY"
        assert spy.calls[1:] == [[(1,), (2,)], [(1,)], [(2,)]]  # split once, never again
        spy.oom_above = None
        assert client.generate("a cube", steps=1).images  # and the server goes on


def test_closed_loop_clients_fill_batches_up_to_the_size(start_server: Any, spy: SpyEngine) -> None:
    """As ``serve-sd15``'s 8 clients do: each sends its next request when its last one answered.
    With the size at 4, the requests that queue while a batch runs go together, never more than 4."""
    server = start_server(spy, server={"batch_size": 4, "max_batch": 16, "queue_size": 16})

    def client_loop(index: int) -> list[int]:
        with DiffstackClient(server.target, timeout=WAIT_S) as client:
            return [client.generate("a cone", seed=100 * index + i, steps=2).images[0].seed for i in range(3)]

    with ThreadPoolExecutor(8) as pool:
        seeds = list(pool.map(client_loop, range(8)))
    assert seeds == [[100 * index + i for i in range(3)] for index in range(8)]
    sizes = [len(call) for call in spy.calls]
    assert sum(sizes) == 24 and max(sizes) == 4  # batches formed from the queue, capped by the size
    assert len(sizes) <= 12, sizes  # mostly full: one request at a time would be 24 calls
