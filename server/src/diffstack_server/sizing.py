"""The batch size the batcher forms, chosen by measuring this device, and every size warmed.

A fixed ``max_batch = 4`` left an H200 mostly idle. At start, on the engine's device thread, the
server times real generations of the default model (``server.batch_measure_steps`` steps, distinct
prompts and seeds, so the batches look like mixed client traffic) at 1, 2, 4, … images up to
``server.max_batch``, and keeps the largest size whose images/s still improves on the best smaller
size by ``server.batch_min_gain``.

Each size is warmed before it is timed (:func:`warm_size`), because its first runs are not what a
client's batch costs: on a compiled stack with CUDA graphs (torch_compile, mode reduce-overhead) a
new shape runs eagerly once (and Dynamo may recompile for a new batch size), is *recorded* on its
next call, and only *replays* from the call after; the VAE decode is called once a batch, so it is
two whole batches behind the denoiser. A size therefore runs untimed at least twice, then until two
consecutive runs agree within :data:`SETTLED_WITHIN` (at most :data:`MAX_WARM_RUNS` runs), and is
then timed as the best of :data:`TIMED_RUNS` runs. (Timing the second run, as this module once did,
timed the recording run: an H200 measured two images 30% slower than one and kept one.)

One size that gains too little does not end the search: timing noise or one slow run could cut it
short, so the next size is tried too, and the search ends after two sizes in a row without the gain
(throughput that stopped growing at two sizes has stopped). A size that runs out of memory ends the
search: the size before it is the largest that fits. So does ``server.batch_measure_budget_s``: a
size is started only when its expected cost (its warm-up and timed runs, scaled from the last
size's batch time) still fits, and everything run, warm-ups included, counts against it.

Only CUDA is measured: on a CPU the search would cost up to the budget of start-up for a choice that
hardly matters (images/s barely grows with the batch there), so ``server.cpu_batch_size`` is used
unless ``server.measure_batch_on_cpu`` asks to measure. A measured choice is kept beside the stack's
decision, under the same key plus the sizing settings (:class:`~diffstack.decisions.DecisionStore`),
so a restart that restored its stack also restores its batch size without running a batch; any
change to the card, driver, versions, plugins, model or settings measures again.

Warming: a batch can be any number of images up to the size, and each number records its own CUDA
graphs (torch_compile's dynamic batch dimension means one compile serves them all). On CUDA
(``server.warm_batches``) every size the measurement did not run is left in
:attr:`BatchSizeChoice.pending`; the server warms them after SERVING, between client batches, each
with :func:`warm_size` (so the first client batch of that size replays), and lets the batcher form a
size only once it and every smaller one are warmed (``server.warm_before_serving`` warms them all
before SERVING instead). While one warms, the queue counts its expected time
(:meth:`BatchSizeChoice.expected_warm_s`: its fewest runs at the batch time scaled from the largest
timed size) in its admission estimate (:meth:`~diffstack_server.batching.BatchQueue.hold`). With
``server.batch_size`` set, nothing is measured: that size (capped by ``max_batch``) is used and
warmed the same way.

Wrappers that run on the compiled denoiser (DeepCache) compile graphs of their own; the engine's
load no longer warms them (DeepCache's took 77 s of an H200's cold start, for a wrapper clients
enable per request). The server warms each one the engine lists
(:attr:`~diffstack.engine.LoadedModel.unwarmed_wrappers`, default model) with :func:`warm_wrapper`
after SERVING, once every pending batch size is warm (plain requests are the bulk of the traffic),
on the device thread once nothing has been queued or running for ``server.wrapper_warm_quiet_s``
(a lull, not the gap between two requests of a steady stream); ``server.warm_before_serving`` warms
them before SERVING too, and ``server.warm_wrappers = false`` leaves them to their first use. Each
warm-up's seconds are kept beside the batch size, under its key (``<model>.wrappers.json``), and
are what the queue expects the next start's warm-up of that wrapper to take
(:func:`expected_wrapper_warm_s`; :data:`DEFAULT_WRAPPER_WARM_S` when none is kept) while it
holds the device thread. A request that uses one earlier compiles it itself (slow once, never
wrong); a wrapper batch of more than one image records its CUDA graphs on first use.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from diffstack.decisions import DecisionStore
from diffstack.engine import GenerationJob, GenerationRequest
from diffstack.errors import DiffstackError, OutOfMemory

if TYPE_CHECKING:
    from diffstack.config import ServerSettings
    from diffstack_server.protocols import ServingEngine

log = structlog.get_logger("diffstack.server.sizing")


@dataclass
class BatchSizeChoice:
    """The batch size, how it was chosen, and what the runs measured."""

    size: int
    measured: bool
    reason: str
    images_per_s: dict[int, float] = field(default_factory=dict)
    """Images/s of each timed size."""
    batch_seconds: dict[int, float] = field(default_factory=dict)
    """Seconds of one timed batch of each size."""
    units_per_image: float = 0.0
    """Steps × pixels of one probe image (to seed the queue's time per unit of work)."""
    warmed: list[int] = field(default_factory=list)
    """Every size run so far (measured or warmed), ascending."""
    pending: list[int] = field(default_factory=list)
    """Sizes still to warm (after SERVING), ascending."""
    restored: bool = False
    """Taken from the kept decision of an earlier start, not measured now."""
    decided_at: float | None = None
    """When it was measured (Unix seconds)."""
    measure_s: float = 0.0
    """Seconds spent measuring (0 when restored or configured)."""
    warm_s: dict[int, float] = field(default_factory=dict)
    """Seconds of each size's untimed warm-up runs together (on a compiled stack: its compile and
    CUDA-graph recording), measured sizes included."""

    def batch_s(self, size: int) -> float | None:
        """Seconds of one replayed batch of ``size`` images, scaled from the largest timed size (None
        when nothing was timed)."""
        if not self.batch_seconds:
            return None
        last = max(self.batch_seconds)
        return self.batch_seconds[last] * size / last

    def expected_warm_s(self, size: int) -> float:
        """How long warming ``size`` should take: its fewest runs (:data:`MIN_WARM_RUNS`) at the
        scaled batch time, else :data:`DEFAULT_SIZE_WARM_S`. A new shape's compile or recording
        makes it longer; the queue's hold allows for that (:class:`~diffstack_server.batching.Hold`)."""
        batch_s = self.batch_s(size)
        return DEFAULT_SIZE_WARM_S if batch_s is None else MIN_WARM_RUNS * batch_s

    @property
    def ready_size(self) -> int:
        """The largest size the batcher may form now: no size up to it is still pending. One image is
        always allowed (the engine's own warm-up ran it)."""
        size = 0
        while size < self.size and size + 1 not in self.pending:
            size += 1
        return max(1, size)

    def kept(self) -> dict[str, Any]:
        """What a restart needs to skip measuring."""
        return {
            "size": self.size,
            "reason": self.reason,
            "images_per_s": self.images_per_s,
            "batch_seconds": self.batch_seconds,
            "units_per_image": self.units_per_image,
            "decided_at": self.decided_at,
        }

    @classmethod
    def from_kept(cls, saved: dict[str, Any]) -> BatchSizeChoice:
        return cls(
            size=int(saved["size"]),
            measured=True,
            reason=f"restored: {saved['reason']}",
            images_per_s={int(k): float(v) for k, v in saved["images_per_s"].items()},
            batch_seconds={int(k): float(v) for k, v in saved["batch_seconds"].items()},
            units_per_image=float(saved["units_per_image"]),
            restored=True,
            decided_at=float(saved["decided_at"]),
        )


def candidate_sizes(cap: int) -> list[int]:
    """1, 2, 4, … below ``cap``, then ``cap`` itself."""
    sizes, size = [], 1
    while size < cap:
        sizes.append(size)
        size *= 2
    return [*sizes, max(1, cap)]


KIND = "batch"
"""The name batch-size decisions are kept under, beside the stack's (``<model>.batch.json``)."""
WRAPPERS_KIND = "wrappers"
"""The name the wrappers' warm-up seconds are kept under, beside the batch size's decision and under
its key (``<model>.wrappers.json``): what the queue expects the next start's warm-up to take."""
DEFAULT_WRAPPER_WARM_S = 60.0
"""A wrapper's expected warm-up when no earlier start kept one: DeepCache's took 77 s of a cold H200
start and 14 s of a restart; with no file kept this is likely a cold start, and the hold's doubling
covers a longer one (:class:`~diffstack_server.batching.Hold`)."""
DEFAULT_SIZE_WARM_S = 5.0
"""A batch size's expected warm-up when no size was timed (``server.batch_size`` set): an H200 warmed
each of SD1.5's sizes in 1-3 s."""


def choose_batch_size(
    engine: ServingEngine,
    settings: ServerSettings,
    clock: Callable[[], float] = time.perf_counter,
    decisions_dir: Path | None = None,
) -> BatchSizeChoice:
    """Restore (from ``decisions_dir``), measure (``batch_size`` 0) or take the configured size, and
    list the sizes to warm (warming them now with ``warm_before_serving``). Call on the engine's
    device thread (:meth:`~diffstack.engine.EngineWorker.submit`)."""
    store = DecisionStore(decisions_dir) if decisions_dir is not None else None
    cap = max(1, settings.max_batch)
    on_cuda = _on_cuda(engine)
    if settings.batch_size:
        choice = BatchSizeChoice(min(settings.batch_size, cap), measured=False, reason="server.batch_size")
    elif not on_cuda and not settings.measure_batch_on_cpu:
        choice = BatchSizeChoice(
            min(settings.cpu_batch_size, cap), measured=False, reason="server.cpu_batch_size (a CPU)"
        )
    else:
        choice = _restore(engine, settings, store) or _measure_and_keep(engine, settings, cap, clock, store)
    warm = settings.warm_batches if settings.warm_batches is not None else on_cuda
    if warm:
        # One image: the engine's own warm-up (engine.warmup_steps) ran it when the model loaded.
        choice.pending = [size for size in range(2, choice.size + 1) if size not in choice.warmed]
        if settings.warm_before_serving:
            while choice.pending:
                warm_next(engine, choice, settings, clock)
    choice.warmed.sort()
    log.info(
        "batch_size",
        size=choice.size,
        measured=choice.measured,
        restored=choice.restored,
        reason=choice.reason,
        images_per_s={k: round(v, 2) for k, v in choice.images_per_s.items()},
        warmed=choice.warmed,
        pending=choice.pending,
        measure_s=round(choice.measure_s, 2),
    )
    return choice


def warm_next(
    engine: ServingEngine,
    choice: BatchSizeChoice,
    settings: ServerSettings,
    clock: Callable[[], float] = time.perf_counter,
) -> int:
    """Warm the smallest pending size with :func:`warm_size` (on the device thread, as one call);
    returns the new :attr:`~BatchSizeChoice.ready_size`."""
    size = choice.pending[0]
    choice.warm_s[size] = sum(warm_size(engine, size, settings.batch_measure_steps, clock))
    choice.pending.remove(size)
    choice.warmed = sorted({*choice.warmed, size})
    return choice.ready_size


def unwarmed_wrappers(engine: ServingEngine) -> list[str]:
    """The default model's wrappers still to warm
    (:attr:`~diffstack.engine.LoadedModel.unwarmed_wrappers`)."""
    model = engine.pin(engine.resolve(""))
    if model is None:
        return []
    try:
        return list(model.unwarmed_wrappers)
    finally:
        engine.unpin(model)


def warm_wrapper(
    engine: ServingEngine,
    name: str,
    settings: ServerSettings,
    clock: Callable[[], float] = time.perf_counter,
    decisions_dir: Path | None = None,
) -> float:
    """Warm the default model's wrapper ``name`` (one image, :func:`warm_size`, on the device thread)
    and take it off the list; returns the seconds it took (its compile, on a compiled stack), which
    are kept in ``decisions_dir`` for :func:`expected_wrapper_warm_s`."""
    seconds = sum(warm_size(engine, 1, settings.batch_measure_steps, clock, wrappers=(name,)))
    _keep_wrapper_warm_s(engine, settings, decisions_dir, name, seconds)
    model = engine.pin(engine.resolve(""))
    if model is not None:
        try:
            if name in model.unwarmed_wrappers:
                model.unwarmed_wrappers.remove(name)
        finally:
            engine.unpin(model)
    log.info("wrapper_warmed", wrapper=name, seconds=round(seconds, 2))
    return seconds


def expected_wrapper_warm_s(
    engine: ServingEngine, name: str, settings: ServerSettings, decisions_dir: Path | None
) -> float:
    """How long warming wrapper ``name`` is expected to take: what the last start that kept it
    measured (:data:`WRAPPERS_KIND`), else :data:`DEFAULT_WRAPPER_WARM_S`. Call on the device thread."""
    kept = _kept_wrapper_warm_s(_wrapper_times_at(engine, settings, decisions_dir))
    return kept.get(name, DEFAULT_WRAPPER_WARM_S)


_KeptAt = tuple[DecisionStore, str, dict[str, str]]
"""Where a decision is kept: the store, the model's name and the key."""


def _wrapper_times_at(
    engine: ServingEngine, settings: ServerSettings, decisions_dir: Path | None
) -> _KeptAt | None:
    """Where the wrappers' warm-up seconds are kept; None when the default model's batch size would
    not be kept either (no ``decisions_dir``, or a stack decision not kept: a CPU)."""
    keyed = _decision_key(engine, settings) if decisions_dir is not None else None
    if keyed is None or decisions_dir is None:
        return None
    return DecisionStore(decisions_dir), *keyed


def _kept_wrapper_warm_s(at: _KeptAt | None) -> dict[str, float]:
    if at is None:
        return {}
    store, model, key = at
    saved = store.load_extra(model, WRAPPERS_KIND, key) or {}
    try:
        return {str(name): float(seconds) for name, seconds in saved.get("warm_s", {}).items()}
    except (TypeError, ValueError, AttributeError) as exc:
        log.warning("wrapper_warm_times_unreadable", error=str(exc)[:200])
        return {}


def _keep_wrapper_warm_s(
    engine: ServingEngine, settings: ServerSettings, decisions_dir: Path | None, name: str, seconds: float
) -> None:
    at = _wrapper_times_at(engine, settings, decisions_dir)
    if at is None:
        return
    store, model, key = at
    try:
        store.save_extra(model, WRAPPERS_KIND, key, {"warm_s": {**_kept_wrapper_warm_s(at), name: seconds}})
    except OSError as exc:
        log.warning("wrapper_warm_time_not_saved", directory=str(store.directory), error=str(exc))


def _decision_key(engine: ServingEngine, settings: ServerSettings) -> tuple[str, dict[str, str]] | None:
    """The default model's key and the key its batch size is kept under (its stack decision's key
    plus the sizing settings); None when its stack decision is not kept."""
    model = engine.pin(engine.resolve(""))
    if model is None or model.decision_key is None:
        return None
    try:
        sizing = settings.model_dump(
            include={"max_batch", "batch_measure_steps", "batch_measure_budget_s", "batch_min_gain"}
        )
        return model.name, {**model.decision_key, "sizing": json.dumps(sizing, sort_keys=True)}
    finally:
        engine.unpin(model)


def _restore(
    engine: ServingEngine, settings: ServerSettings, store: DecisionStore | None
) -> BatchSizeChoice | None:
    keyed = _decision_key(engine, settings) if store is not None else None
    if keyed is None or store is None:
        return None
    saved = store.load_extra(keyed[0], KIND, keyed[1])
    if saved is None:
        return None
    try:
        return BatchSizeChoice.from_kept(saved)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        log.warning("batch_size_decision_unreadable", error=str(exc)[:200])
        return None


def _measure_and_keep(
    engine: ServingEngine,
    settings: ServerSettings,
    cap: int,
    clock: Callable[[], float],
    store: DecisionStore | None,
) -> BatchSizeChoice:
    began = clock()
    choice = _measure(engine, settings, cap, clock)
    choice.measure_s = clock() - began
    choice.decided_at = time.time()
    keyed = _decision_key(engine, settings) if store is not None else None
    if keyed is not None and store is not None:
        try:
            store.save_extra(keyed[0], KIND, keyed[1], choice.kept())
        except OSError as exc:
            log.warning("batch_size_not_saved", directory=str(store.directory), error=str(exc))
    return choice


SETTLED_WITHIN = 0.10
"""Two consecutive warm-up runs whose times differ by at most this fraction (of the slower one) show
a size has settled: it replays its CUDA graphs (compiled stacks) or simply runs steady (eager ones)."""
MIN_WARM_RUNS = 2
"""Untimed runs of a size at least: with CUDA graphs the first runs it eagerly, the second records."""
MAX_WARM_RUNS = 5
"""Untimed runs of a size at most, settled or not, so a noisy device cannot stall start-up."""
TIMED_RUNS = 2
"""Timed runs of each measured size; the fastest counts (a stray slow run is noise, not the size)."""
PATIENCE = 1
"""Sizes tried after one that did not gain enough, before the search ends (see the module's text)."""


def warm_size(
    engine: ServingEngine,
    size: int,
    steps: int,
    clock: Callable[[], float] = time.perf_counter,
    wrappers: tuple[str, ...] = (),
) -> list[float]:
    """Run batches of ``size`` (with ``wrappers``) untimed until the next one replays what they
    recorded: at least :data:`MIN_WARM_RUNS`, then until two consecutive runs agree within
    :data:`SETTLED_WITHIN`, at most :data:`MAX_WARM_RUNS`. Returns each run's seconds."""
    seconds: list[float] = []
    while len(seconds) < MAX_WARM_RUNS:
        began = clock()
        _run(engine, size, steps, wrappers)
        seconds.append(clock() - began)
        if len(seconds) >= MIN_WARM_RUNS and _agree(seconds[-2], seconds[-1]):
            break
    return seconds


def _agree(first: float, second: float) -> bool:
    return abs(first - second) <= SETTLED_WITHIN * max(first, second, 1e-9)


def _measure(
    engine: ServingEngine, settings: ServerSettings, cap: int, clock: Callable[[], float]
) -> BatchSizeChoice:
    started = clock()
    every_size = f"measured up to server.max_batch={cap}"
    choice = BatchSizeChoice(1, measured=True, reason=every_size)
    best_rate, misses = 0.0, 0
    for size in candidate_sizes(cap):
        batch_s = choice.batch_s(size)
        if batch_s is not None:
            runs = MIN_WARM_RUNS + TIMED_RUNS  # the fewest a size takes; a new shape's compile adds more
            if clock() - started + runs * batch_s > settings.batch_measure_budget_s:
                choice.reason = f"server.batch_measure_budget_s={settings.batch_measure_budget_s:g} reached"
                break
        try:
            choice.warm_s[size] = sum(warm_size(engine, size, settings.batch_measure_steps, clock))
            choice.warmed.append(size)
            timed = []
            for _ in range(TIMED_RUNS):
                began = clock()
                units = _run(engine, size, settings.batch_measure_steps)
                timed.append(max(clock() - began, 1e-9))
        except OutOfMemory:
            choice.reason = f"a batch of {size} images did not fit in memory"
            break
        seconds = min(timed)
        choice.batch_seconds[size] = seconds
        choice.units_per_image = units / size
        rate = size / seconds
        choice.images_per_s[size] = rate
        if rate >= best_rate * (1 + settings.batch_min_gain):
            choice.size, best_rate, misses, choice.reason = size, rate, 0, every_size
            continue
        misses += 1
        choice.reason = (
            f"{size} images gave {rate:.2f} images/s, under {settings.batch_min_gain:.0%} more than "
            f"{choice.size} images ({best_rate:.2f})"
        )
        if misses > PATIENCE:
            break
    return choice


def _on_cuda(engine: ServingEngine) -> bool:
    """Whether the default model runs on CUDA."""
    model = engine.pin(engine.resolve(""))
    if model is None:
        return False
    try:
        return model.report.device.startswith("cuda")
    finally:
        engine.unpin(model)


def _run(engine: ServingEngine, size: int, steps: int, wrappers: tuple[str, ...] = ()) -> float:
    """One batch of ``size`` one-image requests with distinct prompts and seeds (each with
    ``wrappers`` at their default options); its work units."""
    requests = [
        engine.prepare(
            GenerationRequest(
                f"batch size probe {i}: a red circle",
                steps=steps,
                seeds=(i,),
                wrappers={name: {} for name in wrappers},
            )
        )
        for i in range(size)
    ]
    outcomes = engine.run([GenerationJob(request) for request in requests])
    for outcome in outcomes:
        if isinstance(outcome, DiffstackError):
            raise outcome
    return float(sum(r.steps * r.width * r.height for r in requests))
