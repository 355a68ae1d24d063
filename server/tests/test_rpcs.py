"""Every RPC of diffstack.v1 against a real server and the real engine on a tiny model."""

from __future__ import annotations

import asyncio
import io
import re
import shutil
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from PIL import Image

from diffstack.config import Settings
from diffstack_client import (
    AsyncDiffstackClient,
    CandidateStatus,
    DiffstackClient,
    Event,
    Finished,
    Generation,
    PluginStatus,
    Preview,
    Progress,
    Queued,
    ServiceError,
    outpaint,
)
from diffstack_client.v1 import diagnostics_pb2, generation_pb2
from diffstack_server import BackgroundServer
from diffstack_server.testing import WAIT_S

STEPS = 3


def test_generate(client: DiffstackClient) -> None:
    result = client.generate("a red cube", steps=STEPS, seed=11, num_images=2)
    assert [image.seed for image in result.images] == [11, 12]
    assert result.model == "tiny-sd1"
    for image in result.images:
        picture = Image.open(io.BytesIO(image.data))
        assert (picture.format, picture.size) == ("PNG", (64, 64))
        assert (image.width, image.height) == (64, 64)
    assert set(result.stack) >= {"select_attention", "encode_prompt", "compile_model"}
    assert {"queue_s", "pipeline_s", "output_s"} <= set(result.timings)
    assert re.fullmatch(r"[0-9a-f]{32}", result.request_id)


@pytest.mark.parametrize(
    ("image_format", "pil_format"), [("png", "PNG"), ("webp", "WEBP"), ("jpeg", "JPEG"), ("raw_rgb", None)]
)
def test_generate_output_formats(client: DiffstackClient, image_format: str, pil_format: str | None) -> None:
    image = client.generate("a cube", steps=1, seed=1, image_format=image_format, quality=70).images[0]  # type: ignore[arg-type]
    assert image.format == image_format
    if pil_format is None:
        assert len(image.data) == 64 * 64 * 3
    else:
        assert Image.open(io.BytesIO(image.data)).format == pil_format
    assert image.to_pil().size == (64, 64)


def test_generate_image_to_image(client: DiffstackClient) -> None:
    start = Image.new("RGB", (64, 64), (200, 30, 30))
    result = client.generate("a red square", steps=4, strength=0.5, init_image=start, seed=5)
    assert result.images[0].to_pil().size == (64, 64)


def test_outpaint_through_the_client_keeps_the_picture_and_fills_the_padding(client: DiffstackClient) -> None:
    start = Image.new("RGB", (32, 64), (200, 30, 30))
    padded, mask = outpaint(start, right=32)
    assert padded.size == mask.size == (64, 64)
    a, b = (
        np.asarray(
            client.generate("a", steps=4, strength=1.0, init_image=padded, mask=mask, seed=s)
            .images[0]
            .to_pil(),
            dtype=np.int16,
        )
        for s in (1, 2)
    )
    assert np.abs(a[:, :24] - b[:, :24]).mean() < np.abs(a[:, 40:] - b[:, 40:]).mean() / 4


def test_a_mask_of_another_size_is_refused_naming_the_field(client: DiffstackClient) -> None:
    start = Image.new("RGB", (64, 64))
    with pytest.raises(ServiceError) as failure:
        client.generate("a", steps=1, init_image=start, mask=Image.new("L", (32, 64)))
    assert failure.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert "spec.mask" in failure.value.violations
    with pytest.raises(ServiceError) as failure:
        client.generate("a", steps=1, init_image=start, mask=b"not an image")
    assert "spec.mask" in failure.value.violations


def test_request_id_from_client_is_echoed(client: DiffstackClient) -> None:
    assert client.generate("a cube", steps=1, request_id="my-id-1").request_id == "my-id-1"
    with pytest.raises(ServiceError) as failure:
        client.generate("a cube", steps=1, width=7, request_id="my-id-2")
    assert failure.value.request_id == "my-id-2"


def test_generate_stream(client: DiffstackClient) -> None:
    events = list(client.stream("a blue sphere", steps=STEPS, seed=21, previews=True, preview_max_side=32))
    assert events[0] == Queued(0)
    progress = [e for e in events if isinstance(e, Progress)]
    assert progress == [Progress(step, STEPS) for step in range(1, STEPS + 1)]
    previews = [e for e in events if isinstance(e, Preview)]
    assert previews, "previews were asked for and the server's interval is 0 in tests"
    for preview in previews:
        assert 1 <= preview.step < STEPS
        assert max(preview.images[0].to_pil().size) <= 32
        assert preview.images[0].format == "jpeg"
    assert isinstance(events[-1], Finished)
    assert [image.seed for image in events[-1].result.images] == [21]
    assert sum(isinstance(e, Finished) for e in events) == 1


def test_generate_stream_without_previews(client: DiffstackClient) -> None:
    events = list(client.stream("a blue sphere", steps=2, seed=3))
    assert not [e for e in events if isinstance(e, Preview)]
    assert isinstance(events[-1], Finished)


def test_list_plugins(client: DiffstackClient) -> None:
    plugins = {p.name: p for p in client.plugins()}
    assert {"sdpa", "schedules", "plain_encoder", "eager"} <= set(plugins)
    sdpa = plugins["sdpa"]
    assert sdpa.status is PluginStatus.LOADED
    assert sdpa.distribution == "diffstack-sdpa"
    assert sdpa.version and sdpa.entry_point
    assert list(sdpa.hooks) == ["select_attention"]


def test_get_stack(client: DiffstackClient) -> None:
    stack = client.stack()
    assert (stack.model, stack.family, stack.device) == ("tiny-sd1", "sd1", "cpu")
    slots = {slot.slot: slot for slot in stack.slots}
    attention = slots["select_attention"]
    assert attention.chosen and attention.candidates
    assert all(c.status is not CandidateStatus.UNSPECIFIED for c in attention.candidates)
    assert any(c.scope for c in attention.candidates)
    assert client.stack("tiny-sd1") == stack


def test_get_stack_of_unknown_model(client: DiffstackClient) -> None:
    with pytest.raises(ServiceError) as failure:
        client.stack("no-such-model")
    assert failure.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert "model" in failure.value.violations


def test_list_models(client: DiffstackClient) -> None:
    models = {model.name: model for model in client.models()}
    assert set(models) == {"tiny-sd1", "tiny-sd2", "tiny-sdxl", "tiny-flux", "synthetic-shapes-flux"}
    shipped = models.pop("synthetic-shapes-flux")  # embedded in the package, listed though not loaded
    assert (shipped.family, shipped.loaded, shipped.is_default) == ("flux", False, False)
    default = models.pop("tiny-sd1")
    assert (default.family, default.loaded, default.is_default) == ("sd1", True, True)
    assert default.weights == diagnostics_pb2.MODEL_WEIGHTS_RANDOM
    assert not any(model.is_default for model in models.values())
    assert models["tiny-flux"].family == "flux"


def test_list_loras(client: DiffstackClient) -> None:
    """The embedded model's LoRA is listed; the loaded tiny model takes no LoRA, and says why."""
    loras = {lora.name: lora for lora in client.loras()}
    swap = loras["colour-swap"]
    assert (swap.base, swap.rank, list(swap.compatible_models)) == ("unet", 8, [])
    assert [problem.split(":")[0] for problem in swap.problems] == ["tiny-sd1"]


def test_get_stats(client: DiffstackClient) -> None:
    before = client.stats()
    client.generate("a cube", steps=1, num_images=2)
    with pytest.raises(ServiceError):
        client.generate("a cube", steps=1, width=9)
    after = client.stats()
    assert after.requests_served == before.requests_served + 1
    assert after.requests_failed == before.requests_failed + 1
    assert after.images_served == before.images_served + 2
    assert after.batches_run == before.batches_run + 1
    assert (after.queue_depth, after.in_flight) == (0, 0)
    assert after.latency.count == before.latency.count + 1
    assert 0 < after.latency.p50 <= after.latency.p90 <= after.latency.p99
    assert after.uptime_s > 0
    assert not after.HasField("gpu_memory_allocated_bytes")  # no GPU here


def test_async_client(server: Any) -> None:
    async def main() -> tuple[Generation, list[Event], int, str]:
        async with AsyncDiffstackClient(server.target, timeout=30) as client:
            await client.wait_until_serving(timeout=30)
            result = await client.generate("a cube", steps=1, seed=4)
            events = [event async for event in client.stream("a cube", steps=2, seed=5)]
            stats = await client.stats()
            assert "colour-swap" in [lora.name for lora in await client.loras()]
            return result, events, stats.requests_served, await client.health()

    result, events, served, health = asyncio.run(main())
    assert result.images[0].seed == 4
    assert isinstance(events[-1], Finished) and events[-1].result.images[0].seed == 5
    assert served == 2
    assert health == "SERVING"


def test_metrics_endpoint(start_server: Any, spy: Any) -> None:
    server = start_server(spy, server={"metrics_port": 0})
    with DiffstackClient(server.target, timeout=30) as client:
        client.generate("a cube", steps=1, num_images=2)
        with pytest.raises(ServiceError):
            client.generate("a cube", steps=1, width=9)
    port = server.server.metrics_port
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    generate = 'method="/diffstack.v1.GenerationService/Generate"'
    assert re.search(rf'diffstack_requests_total{{code="OK",{generate}}} 1\.0', text)
    assert re.search(rf'diffstack_requests_total{{code="INVALID_ARGUMENT",{generate}}} 1\.0', text)
    assert "diffstack_images_served_total 2.0" in text
    assert "diffstack_queue_seconds_count 1.0" in text
    assert "diffstack_compute_seconds_count 1.0" in text
    assert 'diffstack_batch_images_bucket{le="2.0"} 1.0' in text
    assert "diffstack_queue_depth 0.0" in text


def test_every_rpc_has_a_test() -> None:
    """Meta-test: each RPC of the contract has a test here named after it (test_<snake_case>)."""
    rpcs = [
        method.name
        for module in (generation_pb2, diagnostics_pb2)
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    ]
    jobs_tests = (Path(__file__).parent / "test_jobs.py").read_text()  # the job RPCs' tests live there
    missing = [
        rpc
        for rpc in rpcs
        if (name := f"test_{re.sub(r'(?<!^)(?=[A-Z])', '_', rpc).lower()}") not in globals()
        and f"def {name}(" not in jobs_tests
    ]
    assert len(rpcs) == 14
    assert not missing


# -- model lifecycle (admin token) -----------------------------------------------------------------

ADMIN_TOKEN = "s3cret"


@pytest.fixture
def lifecycle_server(
    models_dir: Path, tmp_path: Path, settings_at: Callable[..., Settings]
) -> Iterator[BackgroundServer]:
    """A server with its own engine over the tiny model and two copies, ``other`` and ``third``; at
    most two models loaded; loading on request off (only the admin loads); an admin token."""
    root = tmp_path / "models"
    for name in ("tiny-sd1", "other", "third"):
        shutil.copytree(models_dir / "tiny-sd1", root / name)
    settings = settings_at(
        root, engine={"warmup_steps": 0, "max_loaded_models": 2}, server={"admin_token": ADMIN_TOKEN}
    )
    server = BackgroundServer(settings).start(ready_timeout=WAIT_S)
    yield server
    server.stop(grace=0)


@pytest.fixture
def admin(lifecycle_server: BackgroundServer) -> Iterator[DiffstackClient]:
    with DiffstackClient(lifecycle_server.target, timeout=WAIT_S, admin_token=ADMIN_TOKEN) as client:
        yield client


def _loaded(admin: DiffstackClient) -> dict[str, diagnostics_pb2.Model]:
    return {model.name: model for model in admin.models() if model.loaded}


def test_load_model(admin: DiffstackClient) -> None:
    loaded = admin.load_model("other")
    assert loaded.loaded_now and loaded.model.loaded and loaded.model.name == "other"
    assert loaded.model.host_memory_bytes > 0  # on CPU every parameter is host memory
    assert loaded.model.HasField("device_memory_bytes") and loaded.model.device_memory_bytes == 0
    assert not admin.load_model("other").loaded_now
    assert admin.generate("a cube", steps=1, model="other").model == "other"  # no load on request
    stats = {model.name: model for model in admin.stats().loaded_models}
    assert set(stats) == {"tiny-sd1", "other"}
    assert stats["other"].host_memory_bytes == loaded.model.host_memory_bytes
    admin.load_model("third")  # the cap of two: the least recently used idle model makes room
    assert set(_loaded(admin)) == {"tiny-sd1", "third"}
    assert not next(m for m in admin.models() if m.name == "other").HasField("host_memory_bytes")


def test_unload_model(admin: DiffstackClient) -> None:
    admin.load_model("other")
    assert admin.unload_model("other") is True
    assert set(_loaded(admin)) == {"tiny-sd1"}
    assert admin.unload_model("other") is False
    for name, field in (("", "model"), ("tiny-sd1", "model"), ("no-such-model", "model"), ("../x", "model")):
        with pytest.raises(ServiceError) as failure:
            admin.unload_model(name)
        assert failure.value.code is grpc.StatusCode.INVALID_ARGUMENT, name
        assert field in failure.value.violations
    with pytest.raises(ServiceError) as unknown:
        admin.load_model("no-such-model")
    assert unknown.value.code is grpc.StatusCode.INVALID_ARGUMENT


def test_free_memory(admin: DiffstackClient) -> None:
    held = admin.load_model("other").model.host_memory_bytes
    freed = admin.free_memory()
    assert list(freed.unloaded) == ["other"] and freed.freed_bytes == held
    assert set(_loaded(admin)) == {"tiny-sd1"}
    assert not admin.free_memory().unloaded


def test_model_lifecycle_needs_the_admin_token(lifecycle_server: BackgroundServer) -> None:
    with DiffstackClient(lifecycle_server.target, timeout=WAIT_S, admin_token="wrong") as stranger:
        for call in (
            lambda: stranger.load_model("other"),
            lambda: stranger.unload_model("other"),
            stranger.free_memory,
        ):
            with pytest.raises(ServiceError) as failure:
                call()
            assert failure.value.code is grpc.StatusCode.PERMISSION_DENIED


def test_model_lifecycle_is_off_without_an_admin_token(client: DiffstackClient) -> None:
    """Without ``server.admin_token`` the diagnostics stay open but nobody may load or unload."""
    assert client.models()
    with pytest.raises(ServiceError) as failure:
        client.free_memory()
    assert failure.value.code is grpc.StatusCode.PERMISSION_DENIED
    assert "server.admin_token" in failure.value.message
