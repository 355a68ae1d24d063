"""What a request may weigh: the message limit fits the largest legitimate request and little more;
prompts are measured before tokenizing; unset wire fields take the request type's own defaults."""

from __future__ import annotations

import io
import os

import grpc
import pytest
from PIL import Image

from diffstack.config import Limits
from diffstack.engine import GenerationRequest
from diffstack_client import DiffstackClient, ServiceError
from diffstack_client.v1 import generation_pb2, types_pb2
from diffstack_server.convert import request_from_spec


def largest_request(limits: Limits, data: bytes, image_format: int) -> generation_pb2.GenerateRequest:
    side = int(limits.max_pixels**0.5)
    spec = types_pb2.GenerationSpec(
        prompt="a" * limits.max_prompt_bytes,
        negative_prompt="b" * limits.max_prompt_bytes,
        seeds=list(range(limits.max_images)),
        init_image=types_pb2.Image(data=data, format=image_format, width=side, height=side),  # type: ignore[arg-type]
        mask=types_pb2.Image(data=data, format=image_format, width=side, height=side),  # type: ignore[arg-type]
    )
    return generation_pb2.GenerateRequest(spec=spec)


def test_the_default_message_limit_holds_the_largest_legitimate_request() -> None:
    limits = Limits()
    side = int(limits.max_pixels**0.5)
    noise = os.urandom(side * side * 3)
    jpeg = io.BytesIO()
    Image.frombytes("RGB", (side, side), noise).save(jpeg, "JPEG", quality=100, subsampling=0)
    for data, image_format in (
        (noise, types_pb2.IMAGE_FORMAT_RAW_RGB),
        (jpeg.getvalue(), types_pb2.IMAGE_FORMAT_JPEG),
    ):
        assert largest_request(limits, data, image_format).ByteSize() <= limits.request_message_bytes
    assert limits.request_message_bytes < 10 * 2**20  # it was 64 MiB
    assert limits.response_message_bytes >= limits.max_images * limits.max_pixels * 3


def test_the_limit_follows_the_other_limits() -> None:
    assert Limits(max_pixels=2048 * 2048).request_message_bytes > 4 * Limits().request_message_bytes - 2**20
    assert Limits(max_message_bytes=4096).request_message_bytes == 4096


def test_unset_wire_fields_take_the_request_types_defaults() -> None:
    assert request_from_spec(types_pb2.GenerationSpec(prompt="a"), Limits()) == GenerationRequest("a")
    spec = types_pb2.GenerationSpec(prompt="a", schedule="karras", num_images=2, strength=0.5, guidance=0)
    request = request_from_spec(spec, Limits())
    assert (request.schedule, request.num_images, request.strength, request.guidance) == ("karras", 2, 0.5, 0)


def test_a_huge_prompt_is_refused_by_its_size(client: DiffstackClient) -> None:
    with pytest.raises(ServiceError) as failure:
        client.generate("cat " * 1_000_000, steps=1)
    assert failure.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert failure.value.violations["spec.prompt"] == "4000000 characters, more than the limit of 2000"


def test_echoed_input_stays_small_enough_to_reach_the_client(client: DiffstackClient) -> None:
    with pytest.raises(ServiceError) as failure:
        client.generate("a cube", steps=1, schedule="s" * 4000)
    assert failure.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert len(failure.value.violations["spec.schedule"]) < 300


def test_a_request_wrong_everywhere_still_gets_its_invalid_argument(client: DiffstackClient) -> None:
    """Every echoed value, description and the count of violations are bounded, so the refusal fits
    gRPC's 8 KiB metadata limit; unbounded, the client saw RESOURCE_EXHAUSTED instead."""
    wrappers = {f"{i}" + "w" * 3000: {"k" * 3000: 1} for i in range(400)}
    with pytest.raises(ServiceError) as failure:
        client.generate(
            "a cube", steps=1, schedule="s" * 4000, sampler="x" * 4000, width=7, wrappers=wrappers
        )
    assert failure.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert 2 <= len(failure.value.violations) <= 10
