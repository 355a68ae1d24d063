"""Image-typed plugin options: a wrapper declares a ``PIL.Image.Image`` option, ListPlugins lists it as
type image, and a picture sent in ``OptionValue.image_value`` reaches the wrapper decoded and checked
like ``init_image`` (a bad one is INVALID_ARGUMENT on ``spec.wrappers.<wrapper>.<option>``).

The wrapper is :class:`~diffstack_server.testing.ReferenceRecorder`, a plugin registered with the host
(as simonw/llm's tests register theirs): it keeps what each generation handed it.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from PIL import Image as PILImage

from diffstack.engine import Engine, GenerationRequest
from diffstack.errors import InvalidRequest
from diffstack.option_schema import OptionSpec, OptionType, option_schema
from diffstack_client import DiffstackClient, ServiceError
from diffstack_client import OptionType as WireOptionType
from diffstack_server import BackgroundServer
from diffstack_server.testing import WAIT_S, ReferenceOptions, ReferenceRecorder, Seen

MAX_PIXELS = 96 * 96


def png(size: tuple[int, int], colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    PILImage.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def plugin() -> ReferenceRecorder:
    return ReferenceRecorder()


@pytest.fixture(scope="module")
def reference_engine(models_dir: Path, plugin: ReferenceRecorder, settings_at: Any) -> Engine:
    settings = settings_at(models_dir, limits={"max_pixels": MAX_PIXELS}, engine={"warmup_steps": 0})
    return Engine.start(settings, plugin.host_with(settings))


@pytest.fixture(scope="module")
def reference_server(reference_engine: Engine) -> Iterator[BackgroundServer]:
    with BackgroundServer(reference_engine.settings, reference_engine) as server:
        yield server


def test_option_schema_describes_an_image_option() -> None:
    assert option_schema(ReferenceOptions)[0] == OptionSpec(
        "image", OptionType.IMAGE, nullable=True, description="The reference picture."
    )


def test_a_picture_option_reaches_the_wrapper_through_grpc(
    reference_server: BackgroundServer, plugin: ReferenceRecorder
) -> None:
    with DiffstackClient(reference_server.target, timeout=WAIT_S) as client:
        (wrapper,) = next(p for p in client.plugins() if p.name == "reference").wrappers
        image = next(o for o in wrapper.options if o.name == "image")
        assert (image.type, image.nullable, image.default) == (WireOptionType.IMAGE, True, None)
        plugin.seen.clear()
        red = PILImage.new("RGB", (24, 16), (250, 10, 10))
        client.generate("a cube", steps=1, wrappers={"reference": {"image": red, "weight": 0.25}})
        client.generate("a cube", steps=1, wrappers={"reference": {"image": png((8, 8), (0, 0, 200))}})
        assert plugin.seen == [Seen((24, 16), (250, 10, 10), 0.25), Seen((8, 8), (0, 0, 200), 0.5)]


@pytest.mark.parametrize(
    ("options", "field", "message"),
    [
        ({"image": b"not a picture"}, "image", "not a PNG, JPEG or WebP image"),
        ({"image": png((128, 128), (1, 2, 3))}, "image", f"limit of {MAX_PIXELS} pixels"),
        ({"image": "red.png"}, "image", "instance of Image"),
        ({"weight": png((8, 8), (1, 2, 3))}, "weight", "valid number"),
    ],
)
def test_a_bad_picture_option_is_invalid_argument_on_its_field(
    reference_server: BackgroundServer, options: dict[str, Any], field: str, message: str
) -> None:
    with (
        DiffstackClient(reference_server.target, timeout=WAIT_S) as client,
        pytest.raises(ServiceError) as error,
    ):
        client.generate("a cube", steps=1, wrappers={"reference": options})
    assert error.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert message in error.value.violations[f"spec.wrappers.reference.{field}"]


def test_the_engine_refuses_an_oversized_picture_handed_over_in_python(reference_engine: Engine) -> None:
    big = PILImage.new("RGB", (128, 128))
    request = GenerationRequest("a cube", steps=1, wrappers={"reference": {"image": big}})
    with pytest.raises(InvalidRequest) as error:
        reference_engine.prepare(request)
    assert [v.field for v in error.value.violations] == ["wrappers.reference.image"]


def test_equal_pictures_share_a_batch_and_different_ones_do_not(reference_engine: Engine) -> None:
    def key(colour: tuple[int, int, int]) -> Any:
        picture = PILImage.new("RGB", (8, 8), colour)
        request = GenerationRequest("a cube", steps=1, wrappers={"reference": {"image": picture}})
        return reference_engine.batch_key(reference_engine.prepare(request))

    assert key((1, 2, 3)) == key((1, 2, 3)) != key((3, 2, 1))
