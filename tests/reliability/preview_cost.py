"""What previews add to a request's time: streamed requests with previews at every step vs none.

    .venv/bin/python tests/reliability/preview_cost.py [--size 64 256] [--steps 8] [--repeats 10]

A real server on loopback (``create_server`` in a background thread), the tiny SD1 model of the tests
on CPU, previews at every step (``preview_interval_s`` 0, the worst case a client can ask of a server
configured so), one request at a time; the median wall time per request with previews on and off, and
their ratio. Prints one JSON object; RELIABILITY.md records the figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from diffstack.testing import baseline_settings, save_tiny_model
from diffstack.types import Family
from diffstack_client import DiffstackClient
from diffstack_server import BackgroundServer

MODEL = "tiny-sd1"


def _request_seconds(client: DiffstackClient, size: int, steps: int, previews: bool) -> float:
    started = time.perf_counter()
    events = list(
        client.stream("a red circle", width=size, height=size, steps=steps, seeds=[1], previews=previews)
    )
    seconds = time.perf_counter() - started
    previews_seen = sum(type(e).__name__ == "Preview" for e in events)
    if previews and previews_seen == 0:
        raise RuntimeError("previews were asked for and none came")
    return seconds


def measure(sizes: list[int], steps: int, repeats: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as root:
        save_tiny_model(Family.SD1, Path(root) / MODEL, metadata={"weights": "random"})
        settings = baseline_settings(
            Path(root), MODEL, server={"port": 0, "batch_wait_ms": 0, "preview_interval_s": 0.0}
        )
        server = BackgroundServer(settings).start(ready_timeout=300)
        try:
            with DiffstackClient(server.target, timeout=300) as client:
                rows = []
                for size in sizes:
                    _request_seconds(client, size, steps, previews=True)  # warm-up
                    timings: dict[bool, list[float]] = {True: [], False: []}
                    for _ in range(repeats):  # interleaved, so drifting machine load hits both alike
                        for previews in (False, True):
                            timings[previews].append(_request_seconds(client, size, steps, previews))
                    off, on = (statistics.median(timings[p]) for p in (False, True))
                    rows.append(
                        {"size": size, "steps": steps, "off_s": off, "on_s": on, "ratio": round(on / off, 3)}
                    )
        finally:
            server.stop(grace=0)
    return {"model": MODEL, "device": "cpu", "repeats": repeats, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    print(json.dumps(measure(args.size, args.steps, args.repeats), indent=2))


if __name__ == "__main__":
    main()
