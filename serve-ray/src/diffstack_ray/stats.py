"""The replicas' stats in one place: each replica posts its own GetStatsResponse to one named actor
(at start and on every health probe), and GetStats adds up the fresh posts with its own.

Counters, queue depth, in-flight work and memory add up; latency percentiles are the largest of the
replicas' (percentiles of separate samples do not add, and the worst replica is what a client sees);
uptime is the longest. ``engine`` holds ``replicas`` (how many were counted) and each replica's engine
figures under ``<replica>/<name>``. Loaded models are listed once per replica that holds them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import ray

from diffstack_client.v1 import diagnostics_pb2

STATS_BOARD = "diffstack-stats"
STATS_NAMESPACE = "diffstack"

_SUMMED = ("queue_depth", "in_flight", "requests_served", "requests_failed", "images_served", "batches_run")


@ray.remote(num_cpus=0)
class StatsBoard:
    """The latest serialized GetStatsResponse of each replica, with the time it was posted."""

    def __init__(self) -> None:
        self.posts: dict[str, tuple[float, bytes]] = {}

    def post(self, replica: str, stats: bytes) -> None:
        self.posts[replica] = (time.time(), stats)

    def read(self) -> dict[str, tuple[float, bytes]]:
        return dict(self.posts)


def combined_stats(
    stats: Sequence[tuple[str, diagnostics_pb2.GetStatsResponse]],
) -> diagnostics_pb2.GetStatsResponse:
    """One GetStatsResponse for all of ``stats`` (replica name, its own stats): see the module doc."""
    total = diagnostics_pb2.GetStatsResponse()
    for field in _SUMMED:
        setattr(total, field, sum(getattr(s, field) for _, s in stats))
    allocated = [s.gpu_memory_allocated_bytes for _, s in stats if s.HasField("gpu_memory_allocated_bytes")]
    reserved = [s.gpu_memory_reserved_bytes for _, s in stats if s.HasField("gpu_memory_reserved_bytes")]
    if allocated:
        total.gpu_memory_allocated_bytes = sum(allocated)
    if reserved:
        total.gpu_memory_reserved_bytes = sum(reserved)
    total.latency.count = sum(s.latency.count for _, s in stats)
    total.latency.p50 = max((s.latency.p50 for _, s in stats), default=0.0)
    total.latency.p90 = max((s.latency.p90 for _, s in stats), default=0.0)
    total.latency.p99 = max((s.latency.p99 for _, s in stats), default=0.0)
    total.uptime_s = max((s.uptime_s for _, s in stats), default=0.0)
    total.engine["replicas"] = float(len(stats))
    for replica, s in stats:
        for key, value in s.engine.items():
            total.engine[f"{replica}/{key}"] = value
        total.loaded_models.extend(s.loaded_models)
    return total
