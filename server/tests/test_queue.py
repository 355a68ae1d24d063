"""The queue and batcher alone, driven by a small fake engine (fast, no model)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Hashable, Sequence
from types import SimpleNamespace
from typing import Any

import pytest
from PIL import Image

from diffstack.config import Settings
from diffstack.engine import (
    EngineWorker,
    GeneratedImage,
    GenerationJob,
    GenerationRequest,
    GenerationResult,
    StepEvent,
)
from diffstack.errors import Cancelled, DiffstackError, NotReady, Overloaded
from diffstack_server import app
from diffstack_server.batching import BatchQueue, BatchTiming, Hold, work_units
from diffstack_server.metrics import Metrics
from diffstack_server.sizing import BatchSizeChoice
from diffstack_server.testing import WAIT_S
from diffstack_server.tickets import Progress, Queued, Ticket


class FakeEngine:
    """Runs ``steps`` fake steps per batch; each step waits for ``step_gate`` when one is set."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.step_gate: threading.Event | None = None
        self.step_permits: threading.Semaphore | None = None
        """When set, every step takes one permit (a test lets steps through one by one)."""
        self.steps_run: dict[str, int] = {}
        self.collect_gate: threading.Event | None = None
        """When set, a launched batch's images reach the host only once the gate opens."""
        self.collected: list[list[str]] = []
        self.started = threading.Event()

    def batch_key(self, request: GenerationRequest) -> Hashable:
        return (request.steps, request.width)

    def run(self, jobs: Sequence[GenerationJob]) -> list[GenerationResult | DiffstackError]:
        self.calls.append([job.request.prompt for job in jobs])
        self.started.set()
        stopped: dict[int, DiffstackError] = {}
        total = jobs[0].request.steps
        for step in range(1, total + 1):
            if self.step_gate is not None:
                assert self.step_gate.wait(WAIT_S)
            if self.step_permits is not None:
                assert self.step_permits.acquire(timeout=WAIT_S)
            for job in jobs:
                self.steps_run[job.request.prompt] = step
            for index, job in enumerate(jobs):
                if index not in stopped and (reason := job.should_stop()) is not None:
                    stopped[index] = reason
                elif index not in stopped and job.on_step is not None:
                    job.on_step(StepEvent(step, total, lambda side: [Image.new("RGB", (side, side))]))
            if len(stopped) == len(jobs):
                break
        image = Image.new("RGB", (8, 8))
        return [
            stopped.get(i) or GenerationResult((GeneratedImage(image, job.request.seeds[0]),), "fake", {}, {})
            for i, job in enumerate(jobs)
        ]

    def launch(self, jobs: Sequence[GenerationJob]) -> FakeLaunched:
        return FakeLaunched(self, [job.request.prompt for job in jobs], self.run(jobs))


class FakeLaunched:
    """A batch whose denoising is done; its collection waits for the engine's ``collect_gate``."""

    def __init__(self, engine: FakeEngine, prompts: list[str], outcomes: list[Any]) -> None:
        self.engine, self.prompts, self.outcomes = engine, prompts, outcomes

    def collect(self) -> list[Any]:
        if self.engine.collect_gate is not None:
            assert self.engine.collect_gate.wait(WAIT_S)
        self.engine.collected.append(self.prompts)
        return list(self.outcomes)

    def retry(self, outcomes: list[Any]) -> list[Any]:
        return outcomes


def hosting(engine: FakeEngine) -> EngineWorker:
    return EngineWorker(Settings(), engine)  # type: ignore[arg-type]


def ticket(prompt: str, steps: int = 2, width: int = 8, streaming: bool = True, **extra: Any) -> Ticket:
    request = GenerationRequest(prompt=prompt, steps=steps, width=width, seeds=(len(prompt),), **extra)
    return Ticket(request, (steps, width), prompt, asyncio.get_running_loop(), streaming=streaming)


def run(coroutine: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coroutine, WAIT_S))


def test_groups_by_key_up_to_max_batch_in_arrival_order() -> None:
    async def main() -> list[list[str]]:
        engine = FakeEngine()
        queue = BatchQueue(hosting(engine), Metrics(), queue_size=10, max_batch=2)
        tickets = [ticket("a"), ticket("b", steps=3), ticket("c"), ticket("d"), ticket("e", steps=3)]
        for t in tickets:
            queue.submit(t)
        queue.start()
        await asyncio.gather(*(t.future for t in tickets))
        await queue.drain(WAIT_S)
        await queue.stop()
        return engine.calls

    assert run(main()) == [["a", "c"], ["b", "e"], ["d"]]


def test_full_queue_refuses_and_closed_queue_is_not_ready() -> None:
    async def main() -> None:
        queue = BatchQueue(hosting(FakeEngine()), Metrics(), queue_size=2, max_batch=1)
        queue.submit(ticket("a"))
        queue.submit(ticket("b"))
        with pytest.raises(Overloaded):
            queue.submit(ticket("c"))
        queue.close()
        with pytest.raises(NotReady):
            queue.submit(ticket("d"))

    run(main())


def test_positions_move_up_as_batches_leave() -> None:
    async def main() -> list[Any]:
        engine = FakeEngine()
        engine.step_gate = threading.Event()
        queue = BatchQueue(hosting(engine), Metrics(), queue_size=10, max_batch=1)
        first, second, third = ticket("a"), ticket("b"), ticket("c")
        for t in (first, second, third):
            queue.submit(t)
        queue.start()
        engine.step_gate.set()
        events = [event async for event in third.events()]
        await queue.drain(WAIT_S)
        await queue.stop()
        return events

    events = run(main())
    queued = [e for e in events if isinstance(e, Queued)]
    assert queued == [Queued(2), Queued(1), Queued(0)]
    assert [e for e in events if isinstance(e, Progress)] == [Progress(1, 2), Progress(2, 2)]


def test_abort_after_grace_stops_running_work_and_fails_the_queue() -> None:
    async def main() -> tuple[BaseException | None, BaseException | None]:
        engine = FakeEngine()
        engine.step_gate = threading.Event()
        queue = BatchQueue(hosting(engine), Metrics(), queue_size=10, max_batch=1)
        running, waiting = ticket("a", steps=50), ticket("b")
        queue.submit(running)
        queue.submit(waiting)
        queue.start()
        await asyncio.get_running_loop().run_in_executor(None, engine.started.wait, WAIT_S)
        assert not await queue.drain(0.0)  # the grace has run out: nothing can finish in time
        queue.abort(Cancelled("shutting down"))
        engine.step_gate.set()
        await queue.stop(WAIT_S)
        outcomes = await asyncio.gather(running.future, waiting.future, return_exceptions=True)
        return outcomes[0], outcomes[1]  # type: ignore[return-value]

    running, waiting = run(main())
    assert isinstance(running, Cancelled) and isinstance(waiting, Cancelled)


def test_withdrawn_ticket_leaves_the_queue() -> None:
    async def main() -> list[list[str]]:
        engine = FakeEngine()
        queue = BatchQueue(hosting(engine), Metrics(), queue_size=10, max_batch=4)
        kept, dropped = ticket("a"), ticket("b")
        queue.submit(kept)
        queue.submit(dropped)
        queue.withdraw(dropped)
        assert queue.depth == 1 and isinstance(dropped.future.exception(), Cancelled)
        queue.start()
        await kept.future
        await queue.drain(WAIT_S)
        await queue.stop()
        return engine.calls

    assert run(main()) == [["a"]]


def test_the_queue_is_bounded_in_images_not_requests() -> None:
    async def main() -> None:
        queue = BatchQueue(hosting(FakeEngine()), Metrics(), queue_size=4, max_batch=4)
        queue.submit(ticket("three", num_images=3))
        with pytest.raises(Overloaded, match="3 of 4 images"):
            queue.reserve(2)  # one request, but two images: they do not fit
        place = queue.reserve(1)
        with pytest.raises(Overloaded):
            queue.reserve(1)  # the reserved place counts too
        place.release()
        queue.submit(ticket("one"))

    run(main())


def test_a_deadline_that_cannot_be_met_is_refused_at_once_with_a_retry_hint() -> None:
    async def main() -> None:
        queue = BatchQueue(hosting(FakeEngine()), Metrics(), queue_size=10, max_batch=1)
        unmeasured = ticket("a", height=8)
        unmeasured.deadline = time.monotonic()  # nothing measured yet: admitted
        queue.submit(unmeasured)
        # One unit of work (steps x pixels x images) takes 1 ms: each queued 2-step 8x8 ticket 128 ms.
        queue.timing.observe(units=1000, seconds=1.0)
        late = ticket("b", height=8)
        late.deadline = time.monotonic() + 0.2  # 128 ms ahead + 128 ms of its own > 200 ms
        with pytest.raises(Overloaded, match="deadline cannot be met") as refused:
            queue.submit(late)
        assert refused.value.retry_after_s == pytest.approx(0.128)
        assert queue.depth == 1  # refused before taking a place
        in_time = ticket("c")
        in_time.deadline = time.monotonic() + 10
        queue.submit(in_time)
        queue.submit(ticket("d"))  # no deadline: never refused for time
        assert queue.depth == 3

    run(main())


def test_batch_timing_is_a_moving_average_of_seconds_per_unit() -> None:
    timing = BatchTiming()
    assert timing.seconds(100) is None
    timing.observe(100, 1.0)
    timing.observe(100, 2.0)
    timing.observe(0, 5.0)  # ignored: no work
    assert timing.seconds(100) == pytest.approx(1.3)


async def until(condition: Any) -> None:
    """Poll ``condition`` (cheap, in-process state) until true; the test's WAIT_S bounds it."""
    while not condition():
        await asyncio.sleep(0.005)


def test_the_next_batch_is_launched_while_the_previous_is_still_being_collected() -> None:
    async def main() -> FakeEngine:
        engine = FakeEngine()
        engine.collect_gate = threading.Event()
        queue = BatchQueue(hosting(engine), Metrics(), queue_size=10, max_batch=1)
        first, second, third = ticket("a"), ticket("b"), ticket("c")
        for t in (first, second, third):
            queue.submit(t)
        queue.start()
        # "a" is launched and waits for its images; "b" is launched meanwhile (the overlap); "c"
        # waits until "a" is collected: only one batch is collected while the next one runs.
        await until(lambda: engine.calls == [["a"], ["b"]])
        await asyncio.sleep(0.05)
        assert engine.calls == [["a"], ["b"]] and not first.future.done()
        assert queue.in_flight == 2
        engine.collect_gate.set()
        results = await asyncio.gather(first.future, second.future, third.future)
        assert [r.images[0].seed for r in results] == [1, 1, 1]  # each its own (seed = len(prompt))
        await queue.drain(WAIT_S)
        await queue.stop()
        return engine

    engine = run(main())
    assert engine.calls == [["a"], ["b"], ["c"]]
    assert engine.collected == [["a"], ["b"], ["c"]]  # delivered in launch order


def test_overlapped_batches_lose_and_duplicate_nothing() -> None:
    async def main() -> tuple[list[Ticket], list[Any], FakeEngine]:
        engine = FakeEngine()
        queue = BatchQueue(hosting(engine), Metrics(), queue_size=100, max_batch=3)
        tickets = [ticket("p" * (i + 1), steps=1 + i % 2) for i in range(40)]
        queue.start()
        for t in tickets:  # arrivals spread over the run, so batches form while others are collected
            queue.submit(t)
            await asyncio.sleep(0)
        results = await asyncio.gather(*(t.future for t in tickets))
        await queue.drain(WAIT_S)
        await queue.stop()
        return tickets, results, engine

    tickets, results, engine = run(main())
    assert [r.images[0].seed for r in results] == [t.request.seeds[0] for t in tickets]
    launched = [prompt for call in engine.calls for prompt in call]
    assert sorted(launched) == sorted(t.request.prompt for t in tickets)  # each exactly once
    assert engine.collected == engine.calls


def test_a_request_cancelled_while_the_previous_batch_is_collected_stops_at_its_next_step() -> None:
    async def main() -> tuple[Any, Any, FakeEngine]:
        engine = FakeEngine()
        engine.collect_gate = threading.Event()
        engine.step_permits = threading.Semaphore(1)  # the one step of "a"
        queue = BatchQueue(hosting(engine), Metrics(), queue_size=10, max_batch=1)
        done, cancelled = ticket("a", steps=1), ticket("b", steps=50)
        queue.submit(done)
        queue.submit(cancelled)
        queue.start()
        await until(lambda: len(engine.calls) == 2)  # "a" waits to be collected, "b" is denoising
        queue.withdraw(cancelled)
        engine.step_permits.release()  # "b" takes its first step and sees the cancellation
        engine.step_permits.release()  # (one spare: a step past the first would be a failure)
        engine.collect_gate.set()
        outcomes = await asyncio.gather(done.future, cancelled.future, return_exceptions=True)
        await queue.drain(WAIT_S)
        await queue.stop()
        return outcomes[0], outcomes[1], engine

    first, stopped, engine = run(main())
    assert isinstance(first, GenerationResult)
    assert isinstance(stopped, Cancelled)
    assert engine.steps_run["b"] == 1


def test_a_queued_request_cancelled_during_an_overlap_never_runs() -> None:
    async def main() -> FakeEngine:
        engine = FakeEngine()
        engine.collect_gate = threading.Event()
        queue = BatchQueue(hosting(engine), Metrics(), queue_size=10, max_batch=1)
        tickets = [ticket("a"), ticket("b"), ticket("c")]
        for t in tickets:
            queue.submit(t)
        queue.start()
        await until(lambda: len(engine.calls) == 2)  # "c" waits: "a" is still being collected
        queue.withdraw(tickets[2])
        engine.collect_gate.set()
        await asyncio.gather(tickets[0].future, tickets[1].future)
        await queue.drain(WAIT_S)
        await queue.stop()
        assert isinstance(tickets[2].future.exception(), Cancelled)
        return engine

    assert run(main()).calls == [["a"], ["b"]]


# -------------------------------------------------------------------------------------------------
# Warm-ups holding the device thread, and the pause a wrapper's warm-up waits for
# -------------------------------------------------------------------------------------------------


def test_while_a_warm_up_holds_the_device_only_requests_that_can_finish_after_it_are_admitted() -> None:
    async def main() -> None:
        queue = BatchQueue(hosting(FakeEngine()), Metrics(), queue_size=10, max_batch=1)
        queue.timing.observe(units=1000, seconds=1.0)  # each 2-step 8x8 ticket: 128 ms
        with queue.hold("DeepCache's compiled variant", expected_s=60.0):
            late = ticket("late", height=8)
            late.deadline = time.monotonic() + 10  # ample for 128 ms of work, not after the warm-up
            with pytest.raises(Overloaded, match="warming up DeepCache's compiled variant") as refused:
                queue.submit(late)
            assert refused.value.retry_after_s is not None and refused.value.retry_after_s >= 59.0
            assert queue.depth == 0
            in_time = ticket("in time", height=8)
            in_time.deadline = time.monotonic() + 61
            queue.submit(in_time)
            assert queue.depth == 1
        after = ticket("after", height=8)
        after.deadline = time.monotonic() + 10  # the hold is over: only the work ahead counts
        queue.submit(after)
        assert queue.depth == 2

    run(main())


def test_a_hold_counts_even_before_any_batch_was_measured() -> None:
    async def main() -> None:
        queue = BatchQueue(hosting(FakeEngine()), Metrics(), queue_size=10, max_batch=1)
        with queue.hold("batches of 2 images", expected_s=30.0):
            early = ticket("early")
            early.deadline = time.monotonic() + 5
            with pytest.raises(Overloaded, match="for about 30"):
                queue.submit(early)

    run(main())


def test_a_hold_that_outlasts_its_expected_time_is_expected_to_take_twice_as_long() -> None:
    hold = Hold("a wrapper", expected_s=10.0, began=100.0)
    assert hold.remaining_s(104.0) == pytest.approx(6.0)
    assert hold.remaining_s(110.0) == pytest.approx(10.0)  # overrun: now 20 s expected
    assert hold.remaining_s(125.0) == pytest.approx(15.0)  # and then 40 s


def test_a_batch_queued_behind_a_hold_is_timed_from_its_end() -> None:
    async def main() -> float | None:
        queue = BatchQueue(hosting(FakeEngine()), Metrics(), queue_size=10, max_batch=1)
        queue.start()
        gate = threading.Event()
        with queue.hold("a warm-up", expected_s=1.0):
            warm_up = queue.worker.submit(gate.wait, WAIT_S)
            behind = queue.submit(ticket("behind", steps=1, height=8))
            await asyncio.sleep(0.2)  # the warm-up holds the device thread; "behind" waits for it
            gate.set()
            await asyncio.wrap_future(warm_up)
        await behind.future
        await queue.drain(WAIT_S)
        await queue.stop()
        return queue.timing.seconds(work_units(behind))

    batch_s = run(main())
    assert batch_s is not None and batch_s < 0.1  # its wait behind the warm-up is not its cost


async def steady_traffic(queue: BatchQueue, seconds: float, gap_s: float) -> float:
    """A client sending one-step requests for ``seconds``, each ``gap_s`` after the last answered;
    when the last one answered."""
    end = time.monotonic() + seconds
    while True:
        await queue.submit(ticket("client", steps=1)).future
        answered = time.monotonic()
        if answered >= end:
            return answered
        await asyncio.sleep(gap_s)


def test_a_wrapper_warm_up_waits_for_a_lull_not_a_gap_between_requests(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    quiet_s = 0.3
    warmed_at: list[float] = []

    def warm_wrapper(*args: Any, **kwargs: Any) -> float:
        warmed_at.append(time.monotonic())
        return 1.0

    monkeypatch.setattr(app, "unwarmed_wrappers", lambda engine: ["deepcache"])
    monkeypatch.setattr(app, "expected_wrapper_warm_s", lambda *args: 10.0)
    monkeypatch.setattr(app, "warm_wrapper", warm_wrapper)

    async def main() -> float:
        queue = BatchQueue(hosting(FakeEngine()), Metrics(), queue_size=10, max_batch=1)
        queue.start()
        settings = Settings(
            server={"wrapper_warm_quiet_s": quiet_s},  # type: ignore[arg-type]
            compose={"decisions_dir": tmp_path},  # type: ignore[arg-type]
        )
        engine = queue.worker.engine
        runtime: Any = SimpleNamespace(
            queue=queue, worker=queue.worker, settings=settings, startup={}, started_engine=lambda: engine
        )
        warm = asyncio.create_task(app.warm_pending(runtime, BatchSizeChoice(1, measured=False, reason="")))
        # The queue is idle between requests, but never for the quiet time: no warm-up starts.
        last_answer = await steady_traffic(queue, seconds=2 * quiet_s, gap_s=0.02)
        assert warmed_at == []
        await warm  # the lull: it starts once the queue has been quiet long enough
        await queue.drain(WAIT_S)
        await queue.stop()
        return warmed_at[0] - last_answer

    assert run(main()) >= 0.9 * quiet_s
