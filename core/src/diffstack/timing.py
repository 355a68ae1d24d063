"""Timing that means something: warm-up, device events on CUDA, median of repeats."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def median_ms(fn: Callable[[], object], repeats: int, device: str, warmup: int = 2) -> float:
    """Median wall time of ``fn`` in milliseconds, measured on the device's own clock. Under
    ``no_grad``, as pipelines run: a compiled module timed under ``inference_mode`` would compile a
    graph that serving never uses (Dynamo guards on the mode)."""
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        if device.startswith("cuda"):
            return _cuda_median_ms(fn, repeats)
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1000)
    return statistics.median(samples)


def _cuda_median_ms(fn: Callable[[], object], repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end))
    return statistics.median(samples)


def relative_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    """‖output − reference‖ / ‖reference‖ in float32; NaN or inf never passes a tolerance."""
    out, ref = output.float(), reference.float()
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out - ref).norm() / ref.norm().clamp_min(1e-12))
