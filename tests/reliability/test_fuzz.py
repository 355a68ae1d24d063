"""Property-based fuzzing of a real server: no INTERNAL, no UNKNOWN, healthy and bounded after.

Every request field and raw bytes (strategies in ``fuzzing.py``), 1,500 calls from eight
concurrent clients against a server on loopback that runs the real engine on the tiny SD1 model with
tight limits (so the valid requests among them stay cheap). Derandomized: CI fuzzes the same calls
each run; ``fuzz_soak.py`` runs 10,000 fresh ones against a server process.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent))
import fuzzing

from diffstack.testing import baseline_settings, save_tiny_model
from diffstack.types import Family
from diffstack_client import DiffstackClient
from diffstack_server import BackgroundServer

CALLS_PER_EXAMPLE = 25
EXAMPLES = 60
CLIENTS = 8
RSS_GROWTH_LIMIT = 256 * 2**20
CARD = {"weights": "random", "default_width": 16, "default_height": 16, "default_steps": 1}
LIMITS = {"max_pixels": 32 * 32, "max_steps": 2, "max_images": 2}
SERVER = {
    "port": 0,
    "batch_wait_ms": 0,
    "preview_interval_s": 0.0,
    "queue_size": 8,
    "max_batch": 4,
    "batch_size": 4,
    "batch_measure_steps": 1,
    "admin_token": fuzzing.ADMIN_TOKEN,  # warming each batch size must stay within the limits above
}

codes: Counter[str] = Counter()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundServer]:
    root = tmp_path_factory.mktemp("fuzz-models")
    save_tiny_model(Family.SD1, root / "tiny-sd1", metadata=CARD)
    background = BackgroundServer(baseline_settings(root, "tiny-sd1", limits=LIMITS, server=SERVER))
    background.start(ready_timeout=300)
    yield background
    background.stop(grace=0)


@pytest.fixture(scope="module")
def channel(server: BackgroundServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.target) as channel:
        yield channel


@pytest.mark.slow
def test_fuzzed_calls_never_answer_internal_or_unknown(
    server: BackgroundServer, channel: grpc.Channel
) -> None:
    with DiffstackClient(server.target, timeout=60, admin_token=fuzzing.ADMIN_TOKEN) as client:
        client.generate("a red circle", seeds=[1])  # warm: the first preview fit, the first batch
        rss_before = fuzzing.rss_bytes()
        forbidden: list[tuple[fuzzing.Call, str]] = []

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            derandomize=True,
            database=None,
            phases=[Phase.generate],  # every call is reported below, so nothing needs shrinking
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(batch=st.lists(fuzzing.calls(), min_size=CALLS_PER_EXAMPLE, max_size=CALLS_PER_EXAMPLE))
        def property_holds(batch: list[fuzzing.Call]) -> None:
            outcomes = fuzzing.send_all(channel, batch, CLIENTS)
            codes.update(code for _, code in outcomes)
            forbidden.extend(fuzzing.forbidden(outcomes))

        property_holds()
        assert not forbidden, (
            f"{len(forbidden)} forbidden answers ({fuzzing.summary(codes)}): {forbidden[:10]}"
        )
        assert client.health() == "SERVING"
        assert client.generate("a red circle", seeds=[2]).images, "still serves after the fuzz"
        growth = fuzzing.rss_bytes() - rss_before
    print(f"fuzz: {sum(codes.values())} calls: {fuzzing.summary(codes)}; RSS {growth / 2**20:+.0f} MiB")
    assert sum(codes.values()) >= EXAMPLES * CALLS_PER_EXAMPLE
    assert growth < RSS_GROWTH_LIMIT, (
        f"RSS grew {growth / 2**20:.0f} MiB over the fuzz ({fuzzing.summary(codes)})"
    )
    assert codes["OK"] > 0 and codes["INVALID_ARGUMENT"] > 0, fuzzing.summary(codes)
