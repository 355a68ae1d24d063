"""Latency under load through the gRPC server (``load-sd15``): open-loop arrivals and closed loops.

A production server is judged on throughput at a latency bound. Open loop: requests arrive as a
Poisson process at 10, 20 and 40 requests/s for 15 s each, whatever the server's pace (so queueing
and refusals show); each carries a deadline of :data:`DEADLINE_S`. Closed loop: 8, 32 and 64 clients,
each sending its next request when the last one answered, for 15 s each. 15 s (not 60) keeps the
stage near two and a half minutes on an H200 beside ``serve-sd15``; at 20+ images/s that is still
hundreds of requests per run, enough for a p99. ``--smoke`` scales this to the CPU and the tiny
model: rates 1 and 2 per second and 2 and 4 clients, 4 s each.

Per run: images/s (images answered in the run's wall time), p50/p95/p99 latency of the answered
requests, how many were refused (RESOURCE_EXHAUSTED: queue full, or the deadline could not be met)
and failed otherwise, and the busy fraction: the share of wall time the server's device thread spent
in batches (``diffstack_compute_seconds`` from ``/metrics``), which on a GPU host bounds how busy the
GPU can be. The server is the same process and configuration as ``serve-sd15`` (its compile cache
and kept stack decision, so a run after ``serve-sd15`` starts warm), with the batch size measured.
"""

from __future__ import annotations

import asyncio
import math
import random
import re
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from bench.e2e import PROMPT
from bench.harness import Run, log
from bench.serving import Serving

RATES = (10, 20, 40)
CLIENTS = (8, 32, 64)
SECONDS = 15.0
SMOKE_RATES = (1, 2)
SMOKE_CLIENTS = (2, 4)
SMOKE_SECONDS = 4.0
DEADLINE_S = 10.0
"""Each open-loop request's deadline: the latency bound past which an answer is worthless."""
ESTIMATES = {"save": 25, "boot": 40, "open": SECONDS * len(RATES) + 15, "closed": SECONDS * len(CLIENTS) + 15}


@dataclass
class Tally:
    """What one run's requests came to."""

    latencies: list[float] = field(default_factory=list)
    images: int = 0
    refused: int = 0
    retry_hints: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)

    async def call(self, client: Any, seed: int, kwargs: dict[str, Any], timeout: float) -> None:
        from diffstack_client import ServiceError

        began = time.perf_counter()
        try:
            result = await client.generate(PROMPT, timeout=timeout, **{**kwargs, "seed": seed})
        except ServiceError as error:
            if error.code.name == "RESOURCE_EXHAUSTED":
                self.refused += 1
                if error.retry_after_s is not None:
                    self.retry_hints.append(error.retry_after_s)
            else:
                self.errors[error.code.name] = self.errors.get(error.code.name, 0) + 1
            return
        self.latencies.append(time.perf_counter() - began)
        self.images += len(result.images)


def percentile(values: list[float], q: float) -> float | None:
    """The nearest-rank ``q`` percentile (None without values)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def compute_seconds(metrics_port: int) -> float:
    """The server's total seconds of batches on the device thread, from ``/metrics``."""
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    found = re.search(r"^diffstack_compute_seconds_sum (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


async def open_loop(target: str, rate: float, seconds: float, kwargs: dict[str, Any]) -> Tally:
    """Poisson arrivals at ``rate``/s for ``seconds``; waits for every answer."""
    from diffstack_client.aio import AsyncDiffstackClient

    tally, rng, tasks = Tally(), random.Random(int(rate * 1000)), []
    loop = asyncio.get_running_loop()
    async with AsyncDiffstackClient(target, timeout=DEADLINE_S) as client:
        start, at, seed = loop.time(), 0.0, 0
        while at < seconds:
            await asyncio.sleep(max(0.0, start + at - loop.time()))
            tasks.append(asyncio.ensure_future(tally.call(client, 1_000_000 + seed, kwargs, DEADLINE_S)))
            seed += 1
            at += rng.expovariate(rate)
        await asyncio.gather(*tasks)
    return tally


async def closed_loop(
    target: str, clients: int, seconds: float, kwargs: dict[str, Any], timeout: float
) -> Tally:
    """``clients`` loops, each sending its next request when its last answered, until ``seconds``."""
    from diffstack_client.aio import AsyncDiffstackClient

    tally = Tally()
    loop = asyncio.get_running_loop()
    async with AsyncDiffstackClient(target, timeout=timeout) as client:
        end = loop.time() + seconds

        async def one_client(index: int) -> None:
            seed = 2_000_000 + index * 10_000
            while loop.time() < end:
                await tally.call(client, seed, kwargs, timeout)
                seed += 1

        await asyncio.gather(*(one_client(i) for i in range(clients)))
    return tally


def row(variant: str, tally: Tally, wall_s: float, busy_s: float) -> dict[str, Any]:
    answered = len(tally.latencies)
    return {
        "variant": variant,
        "kind": "load",
        "images_per_s": tally.images / wall_s,
        "p50_s": percentile(tally.latencies, 50),
        "p95_s": percentile(tally.latencies, 95),
        "p99_s": percentile(tally.latencies, 99),
        "answered": answered,
        "refused": tally.refused,
        "errors": tally.errors,
        "busy_fraction": min(1.0, busy_s / wall_s),
        "median_retry_hint_s": percentile(tally.retry_hints, 50),
        "notes": f"{answered} answered, {tally.refused} refused, {sum(tally.errors.values())} failed "
        f"in {wall_s:.1f} s",
    }


def load_stage(run: Run, smoke_compile: bool = False) -> Any:
    rates = SMOKE_RATES if run.smoke else RATES
    client_counts = SMOKE_CLIENTS if run.smoke else CLIENTS
    seconds = SMOKE_SECONDS if run.smoke else SECONDS

    def body(record: dict[str, Any]) -> None:
        bench = Serving(run, "sd15", smoke_compile)
        kwargs = {k: v for k, v in bench.request_kwargs(0).items() if k != "seed"}
        w = bench.workload
        record["workload"] = {
            "label": f"{w.width}x{w.height}, {bench.steps} steps, PNG over gRPC loopback; open loop "
            f"{'/'.join(map(str, rates))} req/s and closed loop {'/'.join(map(str, client_counts))} "
            f"clients, {seconds:g} s each; deadline {DEADLINE_S:g} s (open loop)",
        }
        record["rows"] = rows = []
        parts: dict[str, Any] = {}
        record["parts"] = parts

        def measured(variant: str, work: Any) -> None:
            busy_before, began = compute_seconds(bench.metrics_port), time.perf_counter()
            tally = asyncio.run(work)
            wall = time.perf_counter() - began
            rows.append(row(variant, tally, wall, compute_seconds(bench.metrics_port) - busy_before))
            log(f"[load] {variant}: {rows[-1]['notes']}, {rows[-1]['images_per_s']:.2f} images/s")

        def open_runs(_: dict[str, Any]) -> None:
            for rate in rates:
                measured(f"open loop {rate} req/s", open_loop(bench.target, rate, seconds, kwargs))

        def closed_runs(_: dict[str, Any]) -> None:
            for clients in client_counts:
                work = closed_loop(bench.target, clients, seconds, kwargs, bench.timeout())
                measured(f"closed loop {clients} clients", work)

        try:
            for name, fn in (
                ("save", bench.save),
                ("boot", lambda r: (bench.boot(r, "load"), bench.wait_warmed(r))),
                ("open", open_runs),
                ("closed", closed_runs),
            ):
                result = run.part(parts, name, ESTIMATES[name], fn)
                if name in ("save", "boot") and result["status"] != "ok":
                    raise RuntimeError(
                        f"{name} {result['status']}: {result.get('error') or result.get('reason')}"
                    )
        finally:
            bench.cleanup()
            bench.collect_logs(run.out)

    return body
