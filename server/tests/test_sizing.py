"""The batch size: measured on the tiny model, stopped by memory, gain and budget, every size warmed."""

from __future__ import annotations

from typing import Any

from diffstack.config import ServerSettings
from diffstack_server.sizing import candidate_sizes, choose_batch_size
from diffstack_server.testing import SpyEngine


def sizes_run(spy: SpyEngine) -> list[int]:
    return [len(call) for call in spy.calls]


def settings(**fields: Any) -> ServerSettings:
    return ServerSettings(batch_measure_steps=1, **{"warm_batches": True, **fields})


def test_candidates_double_up_to_the_cap() -> None:
    assert candidate_sizes(1) == [1]
    assert candidate_sizes(6) == [1, 2, 4, 6]
    assert candidate_sizes(8) == [1, 2, 4, 8]


def test_the_largest_size_that_still_gains_is_chosen_and_smaller_ones_warmed(engine: Any) -> None:
    spy = SpyEngine(engine)
    # Each batch takes one tick whatever its size, so images/s doubles with the size up to the cap.
    choice = choose_batch_size(spy, settings(max_batch=4), clock=lambda: float(len(spy.calls)))
    assert choice.measured and choice.size == 4
    assert sorted(choice.images_per_s) == [1, 2, 4]
    assert choice.images_per_s[4] == 4 * choice.images_per_s[1]
    assert sizes_run(spy) == [1, 1, 2, 2, 4, 4, 3]  # untimed then timed per candidate; 3 warmed after
    assert choice.warmed == [1, 2, 3, 4]
    assert choice.units_per_image == 64 * 64  # one step of the tiny model's 64x64


def test_a_size_without_gain_ends_the_search(engine: Any) -> None:
    spy = SpyEngine(engine)
    # Time grows with the images run: images/s is flat, so batching gains nothing.
    choice = choose_batch_size(spy, settings(max_batch=8), clock=lambda: float(sum(sizes_run(spy))))
    assert choice.size == 1
    assert "under 5% more" in choice.reason
    assert sizes_run(spy) == [1, 1, 2, 2]


def test_running_out_of_memory_ends_the_search_at_the_size_that_fit(engine: Any) -> None:
    spy = SpyEngine(engine, oom_above=2)
    choice = choose_batch_size(spy, settings(max_batch=16), clock=lambda: float(len(spy.calls)))
    assert choice.size == 2
    assert "did not fit in memory" in choice.reason


def test_the_budget_bounds_the_measurement(engine: Any) -> None:
    spy = SpyEngine(engine)
    choice = choose_batch_size(
        spy, settings(max_batch=16, batch_measure_budget_s=7), clock=lambda: float(len(spy.calls))
    )
    # The next size is expected to take twice its share of the last one's time (an untimed and a
    # timed run): size 2 expected 4 ticks after 2 (6 <= 7); size 4 expected 4 after 4 (8 > 7).
    assert choice.size == 2 and "budget" in choice.reason


def test_a_configured_size_is_not_measured_but_warmed(engine: Any) -> None:
    spy = SpyEngine(engine)
    choice = choose_batch_size(spy, settings(batch_size=3, max_batch=16))
    assert (choice.size, choice.measured, choice.images_per_s) == (3, False, {})
    assert sizes_run(spy) == [1, 2, 3]
    spy.calls.clear()
    assert choose_batch_size(spy, settings(batch_size=32, max_batch=2, warm_batches=False)).size == 2
    assert spy.calls == []
    assert choose_batch_size(spy, settings(batch_size=2, warm_batches=None)).warmed == []  # a CPU: no graphs
    assert spy.calls == []


def test_the_server_forms_the_measured_size(start_server: Any, spy: SpyEngine) -> None:
    server = start_server(spy, server={"batch_size": 0, "max_batch": 2, "batch_measure_steps": 1})
    choice = server.server.batch_size
    assert choice is not None and choice.measured and 1 <= choice.size <= 2
    assert server.server.runtime.queue.max_batch == choice.size
    assert server.server.runtime.queue.timing.seconds_per_unit is not None
