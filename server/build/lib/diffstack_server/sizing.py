"""The batch size the batcher forms, chosen by measuring this device, and every size warmed.

A fixed ``max_batch = 4`` left an H200 mostly idle. At start, on the engine's device thread, the
server times real generations of the default model (``server.batch_measure_steps`` steps, distinct
prompts and seeds, so the batches look like mixed client traffic) at 1, 2, 4, … images up to
``server.max_batch``, and keeps the largest size whose images/s still improves on the best smaller
size by ``server.batch_min_gain``. Each size runs once untimed first (that run records the CUDA graphs
of compiled stacks and settles allocator and cache state), then once timed. A size that runs out of
memory ends the search: the size before it is the largest that fits. The search also stops when the
next size would overrun ``server.batch_measure_budget_s`` (on a CPU this bound, with the small step
count, keeps start-up short).

Afterwards, on CUDA (``server.warm_batches``), every size from 1 to the chosen one that the search
did not run is run once, so no client's batch records graphs after SERVING (a batch can be any
number of images up to the size; torch_compile's dynamic batch dimension means one compile serves
them all, each size records its own graphs). With ``server.batch_size`` set, nothing is measured:
that size (capped by ``max_batch``) is used and warmed the same way.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import structlog

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
    """Every size run before SERVING (measured or warmed), ascending."""


def candidate_sizes(cap: int) -> list[int]:
    """1, 2, 4, … below ``cap``, then ``cap`` itself."""
    sizes, size = [], 1
    while size < cap:
        sizes.append(size)
        size *= 2
    return [*sizes, max(1, cap)]


def choose_batch_size(
    engine: ServingEngine, settings: ServerSettings, clock: Callable[[], float] = time.perf_counter
) -> BatchSizeChoice:
    """Measure (``batch_size`` 0) or take the configured size, then warm every smaller size. Call
    on the engine's device thread (:meth:`~diffstack.engine.EngineWorker.submit`)."""
    cap = max(1, settings.max_batch)
    if settings.batch_size:
        choice = BatchSizeChoice(min(settings.batch_size, cap), measured=False, reason="server.batch_size")
    else:
        choice = _measure(engine, settings, cap, clock)
    warm = settings.warm_batches if settings.warm_batches is not None else _on_cuda(engine)
    for size in range(1, choice.size + 1) if warm else ():
        if size not in choice.warmed:
            _run(engine, size, settings.batch_measure_steps)
            choice.warmed.append(size)
    choice.warmed.sort()
    log.info(
        "batch_size",
        size=choice.size,
        measured=choice.measured,
        reason=choice.reason,
        images_per_s={k: round(v, 2) for k, v in choice.images_per_s.items()},
        warmed=choice.warmed,
    )
    return choice


def _measure(
    engine: ServingEngine, settings: ServerSettings, cap: int, clock: Callable[[], float]
) -> BatchSizeChoice:
    started = clock()
    choice = BatchSizeChoice(1, measured=True, reason=f"measured up to server.max_batch={cap}")
    best_rate = 0.0
    for size in candidate_sizes(cap):
        if choice.batch_seconds:
            last = max(choice.batch_seconds)
            expected = 2 * choice.batch_seconds[last] * size / last  # the untimed run and the timed one
            if clock() - started + expected > settings.batch_measure_budget_s:
                choice.reason = f"server.batch_measure_budget_s={settings.batch_measure_budget_s:g} reached"
                break
        try:
            _run(engine, size, settings.batch_measure_steps)
            choice.warmed.append(size)
            began = clock()
            units = _run(engine, size, settings.batch_measure_steps)
        except OutOfMemory:
            choice.reason = f"a batch of {size} images did not fit in memory"
            break
        seconds = max(clock() - began, 1e-9)
        choice.batch_seconds[size] = seconds
        choice.units_per_image = units / size
        rate = size / seconds
        choice.images_per_s[size] = rate
        if rate < best_rate * (1 + settings.batch_min_gain):
            choice.reason = (
                f"{size} images gave {rate:.2f} images/s, under {settings.batch_min_gain:.0%} more than "
                f"{choice.size} images ({best_rate:.2f})"
            )
            break
        choice.size, best_rate = size, rate
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


def _run(engine: ServingEngine, size: int, steps: int) -> float:
    """One batch of ``size`` one-image requests with distinct prompts and seeds; its work units."""
    requests = [
        engine.prepare(GenerationRequest(f"batch size probe {i}: a red circle", steps=steps, seeds=(i,)))
        for i in range(size)
    ]
    outcomes = engine.run([GenerationJob(request) for request in requests])
    for outcome in outcomes:
        if isinstance(outcome, DiffstackError):
            raise outcome
    return float(sum(r.steps * r.width * r.height for r in requests))
