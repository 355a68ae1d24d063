"""Result images: encoded in parallel on the encoder's threads, WebP's effort and lossless options."""

from __future__ import annotations

import asyncio
import io
import threading

import numpy as np
import pytest
from PIL import Image

from diffstack.engine import GeneratedImage, GenerationResult
from diffstack.errors import InvalidRequest
from diffstack_client import DiffstackClient
from diffstack_client.v1 import types_pb2
from diffstack_server import convert
from diffstack_server.encoding import ImageEncoder, encode_threads


def noise(seed: int, side: int = 48) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def test_every_image_of_a_result_is_encoded_on_the_pool_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    threads: list[str] = []
    real = convert.encode_image

    def recording(picture: Image.Image, options: convert.EncodeOptions) -> types_pb2.Image:
        threads.append(threading.current_thread().name)
        return real(picture, options)

    monkeypatch.setattr(convert, "encode_image", recording)
    pictures = [noise(seed) for seed in range(4)]
    result = GenerationResult(
        tuple(GeneratedImage(p, seed) for seed, p in enumerate(pictures)), "m", {}, {"total_s": 1.0}
    )
    encoder = ImageEncoder(threads=4)
    output = types_pb2.OutputOptions(format=types_pb2.IMAGE_FORMAT_WEBP, lossless=True, effort=0)
    try:
        message = asyncio.run(encoder.result_message(result, output, {"queue_s": 0.5}))
    finally:
        encoder.close()
    assert len(threads) == 4 and all(name.startswith("diffstack-encode") for name in threads)
    assert [g.seed for g in message.images] == [0, 1, 2, 3]
    for generated, picture in zip(message.images, pictures, strict=True):
        decoded = Image.open(io.BytesIO(generated.image.data))
        assert decoded.format == "WEBP"
        assert np.array_equal(np.asarray(decoded.convert("RGB")), np.asarray(picture))  # lossless
    assert dict(message.timings) == {"total_s": 1.0, "queue_s": 0.5}


def test_webp_effort_trades_time_for_size_and_is_checked() -> None:
    picture = noise(7, side=128)
    fast = convert.encode_image(picture, convert.EncodeOptions(types_pb2.IMAGE_FORMAT_WEBP, effort=0))
    small = convert.encode_image(picture, convert.EncodeOptions(types_pb2.IMAGE_FORMAT_WEBP, effort=6))
    assert fast.data != small.data  # the option reaches libwebp
    assert convert.EncodeOptions.from_output(types_pb2.OutputOptions()) == convert.EncodeOptions()
    with pytest.raises(InvalidRequest) as refused:
        convert.check_output(types_pb2.OutputOptions(effort=7))
    assert refused.value.violations[0].field == "output.effort"


def test_encode_threads_default_to_the_cpus_within_bounds() -> None:
    assert encode_threads(3) == 3
    assert 2 <= encode_threads(0) <= 16


def test_clients_pass_webp_options_to_the_server(client: DiffstackClient) -> None:
    generation = client.generate("a red circle", steps=2, image_format="webp", effort=0, lossless=True)
    (image,) = generation.images
    assert image.format == "webp"
    assert Image.open(io.BytesIO(image.data)).format == "WEBP"
