"""The batch size: measured on the tiny model, stopped by memory, gain and budget; a fixed size on a
CPU unless asked to measure; kept beside the stack decision and restored; every size warmed, after
SERVING by default."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from diffstack.config import ServerSettings
from diffstack_client import DiffstackClient
from diffstack_server import sizing
from diffstack_server.sizing import (
    DEFAULT_SIZE_WARM_S,
    DEFAULT_WRAPPER_WARM_S,
    BatchSizeChoice,
    candidate_sizes,
    choose_batch_size,
    expected_wrapper_warm_s,
    warm_wrapper,
)
from diffstack_server.testing import WAIT_S, SpyEngine


def sizes_run(spy: SpyEngine) -> list[int]:
    return [len(call) for call in spy.calls]


def settings(**fields: Any) -> ServerSettings:
    defaults = {"warm_batches": True, "warm_before_serving": True, "measure_batch_on_cpu": True}
    return ServerSettings(batch_measure_steps=1, **{**defaults, **fields})


@pytest.fixture
def kept_key(engine: Any) -> Iterator[dict[str, str]]:
    """The default model's stack decision marked as kept (on a CPU it is not measured, so not kept)."""
    model = engine.model("")
    model.decision_key = {"card": "test card", "torch": "1"}
    yield model.decision_key
    model.decision_key = None


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
    # Per candidate: two untimed runs (they agree: settled), then two timed; 3 is warmed after.
    assert sizes_run(spy) == [1] * 4 + [2] * 4 + [4] * 4 + [3, 3]
    assert choice.warmed == [1, 2, 3, 4]
    assert choice.units_per_image == 64 * 64  # one step of the tiny model's 64x64


def test_a_size_without_gain_ends_the_search(engine: Any) -> None:
    spy = SpyEngine(engine)
    # Time grows with the images run: images/s is flat, so batching gains nothing.
    choice = choose_batch_size(spy, settings(max_batch=8), clock=lambda: float(sum(sizes_run(spy))))
    assert choice.size == 1
    assert "4 images gave 1.00 images/s, under 5% more than 1 images" in choice.reason
    assert sizes_run(spy) == [1] * 4 + [2] * 4 + [4] * 4  # one more size after the first miss


def test_running_out_of_memory_ends_the_search_at_the_size_that_fit(engine: Any) -> None:
    spy = SpyEngine(engine, oom_above=2)
    choice = choose_batch_size(spy, settings(max_batch=16), clock=lambda: float(len(spy.calls)))
    assert choice.size == 2
    assert "did not fit in memory" in choice.reason


def test_the_budget_bounds_the_measurement(engine: Any) -> None:
    spy = SpyEngine(engine)
    choice = choose_batch_size(
        spy, settings(max_batch=16, batch_measure_budget_s=14), clock=lambda: float(len(spy.calls))
    )
    # The next size is expected to take four times its share of the last one's time (two untimed
    # runs and two timed): size 2 expected 8 ticks after 4 (12 <= 14); size 4 expected 8 after 8.
    assert choice.size == 2 and "budget" in choice.reason


def compiled_like(spy: SpyEngine, seconds: Callable[[int], float]) -> Callable[[], float]:
    """A clock for a CUDA-graphed stack: a size's first run compiles (20 ticks), its second records
    (5 ticks), later runs replay in ``seconds(size)``; one image was warmed by the engine already."""

    def clock() -> float:
        total, seen = 0.0, Counter[int]()
        for size in sizes_run(spy):
            total += seconds(size) if size == 1 or seen[size] >= 2 else (20.0, 5.0)[seen[size]]
            seen[size] += 1
        return total

    return clock


def test_a_size_is_timed_only_once_it_replays(engine: Any) -> None:
    spy = SpyEngine(engine)
    # Replays: 1 tick for one image, 1.25 for two, 1.75 for four: the larger the faster per image.
    choice = choose_batch_size(
        spy, settings(max_batch=4), clock=compiled_like(spy, lambda size: 1 + (size - 1) / 4)
    )
    assert choice.size == 4, choice.reason
    assert choice.batch_seconds == {1: 1.0, 2: 1.25, 4: 1.75}
    # Two images: compile, record, then replays until two agree; then two timed replays.
    assert sizes_run(spy)[4:11] == [2] * 6 + [4]
    assert choice.warm_s[2] == 20 + 5 + 1.25 + 1.25
    assert choice.pending == [] and choice.warmed == [1, 2, 3, 4]
    assert sizes_run(spy)[-4:] == [3] * 4  # warmed the same way: its first client batch replays


def test_one_size_without_gain_does_not_end_the_search(engine: Any) -> None:
    spy = SpyEngine(engine)
    # Two images are no faster per image than one (a slow run, say), but four are.
    choice = choose_batch_size(
        spy,
        settings(max_batch=8, batch_measure_budget_s=1000),
        clock=compiled_like(spy, lambda size: {1: 1, 2: 2, 8: 8}.get(size, 2)),
    )
    assert choice.size == 4 and sorted(choice.images_per_s) == [1, 2, 4, 8]
    assert "8 images gave 1.00 images/s" in choice.reason  # eight gained nothing either


def test_a_configured_size_is_not_measured_but_warmed(engine: Any) -> None:
    spy = SpyEngine(engine)
    choice = choose_batch_size(spy, settings(batch_size=3, max_batch=16), clock=lambda: float(len(spy.calls)))
    assert (choice.size, choice.measured, choice.images_per_s) == (3, False, {})
    assert sizes_run(spy) == [2, 2, 3, 3]  # each until settled; one image: the engine's warm-up ran it
    spy.calls.clear()
    assert choose_batch_size(spy, settings(batch_size=32, max_batch=2, warm_batches=False)).size == 2
    assert spy.calls == []
    assert choose_batch_size(spy, settings(batch_size=2, warm_batches=None)).pending == []  # a CPU: no graphs
    assert spy.calls == []


def test_a_cpu_takes_the_fixed_size_without_measuring(engine: Any) -> None:
    spy = SpyEngine(engine)
    choice = choose_batch_size(spy, ServerSettings(cpu_batch_size=3, max_batch=16))
    assert (choice.size, choice.measured, choice.pending) == (3, False, [])
    assert "cpu_batch_size" in choice.reason
    assert spy.calls == []
    assert choice.ready_size == 3


def test_a_measured_size_is_kept_and_restored_without_running_a_batch(
    engine: Any, kept_key: dict[str, str], tmp_path: Path
) -> None:
    spy = SpyEngine(engine)
    first = choose_batch_size(
        spy, settings(max_batch=4), clock=lambda: float(len(spy.calls)), decisions_dir=tmp_path
    )
    assert first.size == 4 and not first.restored
    saved = json.loads((tmp_path / f"{engine.model('').name}.batch.json").read_text())
    assert saved["key"]["card"] == "test card" and saved["size"] == 4
    spy.calls.clear()
    again = choose_batch_size(spy, settings(max_batch=4, warm_before_serving=False), decisions_dir=tmp_path)
    assert again.restored and again.size == 4 and again.batch_seconds == first.batch_seconds
    assert spy.calls == []  # nothing measured; every size left to warm after SERVING
    assert again.pending == [2, 3, 4] and again.ready_size == 1


def test_a_changed_key_or_sizing_setting_measures_again(
    engine: Any, kept_key: dict[str, str], tmp_path: Path
) -> None:
    spy = SpyEngine(engine)
    choose_batch_size(spy, settings(max_batch=2), decisions_dir=tmp_path)
    spy.calls.clear()
    kept_key["torch"] = "2"
    assert not choose_batch_size(spy, settings(max_batch=2), decisions_dir=tmp_path).restored
    assert spy.calls  # measured again
    spy.calls.clear()
    assert not choose_batch_size(spy, settings(max_batch=1), decisions_dir=tmp_path).restored
    assert spy.calls


def test_a_corrupt_kept_size_is_set_aside_with_a_warning_and_measured_again(
    engine: Any, kept_key: dict[str, str], tmp_path: Path, caplog: Any
) -> None:
    spy = SpyEngine(engine)
    choose_batch_size(spy, settings(max_batch=2), decisions_dir=tmp_path)
    path = tmp_path / f"{engine.model('').name}.batch.json"
    path.write_text("{not json")
    spy.calls.clear()
    choice = choose_batch_size(spy, settings(max_batch=2), decisions_dir=tmp_path)
    assert not choice.restored and spy.calls
    assert path.with_suffix(".corrupt").exists()
    assert json.loads(path.read_text())["size"] == choice.size  # written afresh, nothing lost


def test_a_wrappers_warm_up_time_is_kept_for_the_next_start_to_expect(
    engine: Any, kept_key: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sizing, "warm_size", lambda *args, **kwargs: [13.5, 0.5])  # no wrapper runs
    server = settings()
    assert expected_wrapper_warm_s(engine, "deepcache", server, tmp_path) == DEFAULT_WRAPPER_WARM_S
    assert warm_wrapper(engine, "deepcache", server, decisions_dir=tmp_path) == 14.0
    assert expected_wrapper_warm_s(engine, "deepcache", server, tmp_path) == 14.0
    assert expected_wrapper_warm_s(engine, "other", server, tmp_path) == DEFAULT_WRAPPER_WARM_S
    kept_key["torch"] = "2"  # another stack: its warm-up is not this one's
    assert expected_wrapper_warm_s(engine, "deepcache", server, tmp_path) == DEFAULT_WRAPPER_WARM_S


def test_a_sizes_expected_warm_up_is_its_fewest_runs_at_the_scaled_batch_time() -> None:
    choice = BatchSizeChoice(4, measured=True, reason="", batch_seconds={1: 0.5, 2: 0.6})
    assert choice.expected_warm_s(4) == pytest.approx(2 * 0.6 * 4 / 2)
    assert BatchSizeChoice(4, measured=False, reason="").expected_warm_s(4) == DEFAULT_SIZE_WARM_S


def test_ready_size_grows_only_over_warmed_sizes() -> None:
    choice = BatchSizeChoice(4, measured=True, reason="", pending=[1, 3, 4], warmed=[2])
    assert choice.ready_size == 1
    choice.pending = [3, 4]
    assert choice.ready_size == 2
    choice.pending = []
    assert choice.ready_size == 4


def test_pending_sizes_are_warmed_after_serving_then_formed(start_server: Any, spy: SpyEngine) -> None:
    server = start_server(
        spy, server={"batch_size": 3, "max_batch": 8, "batch_measure_steps": 1, "warm_batches": True}
    )
    queue, choice = server.server.runtime.queue, server.server.batch_size
    deadline = time.monotonic() + WAIT_S
    while queue.max_batch < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert queue.max_batch == 3 and choice.pending == []
    warm = sizes_run(spy)
    assert warm == sorted(warm) and warm.count(2) >= 2 and warm.count(3) >= 2  # smallest first, settled
    with DiffstackClient(server.target, timeout=WAIT_S) as client:
        stats = dict(client.stats().engine)
    assert stats["startup_to_serving_s"] > 0 and "startup_imports_s" in stats
    assert stats["batch_size"] == 3.0


def test_the_server_forms_the_measured_size(start_server: Any, spy: SpyEngine) -> None:
    server = start_server(
        spy,
        server={"batch_size": 0, "max_batch": 2, "batch_measure_steps": 1, "measure_batch_on_cpu": True},
    )
    choice = server.server.batch_size
    assert choice is not None and choice.measured and 1 <= choice.size <= 2
    assert server.server.runtime.queue.max_batch == choice.size
    assert server.server.runtime.queue.timing.seconds_per_unit is not None
