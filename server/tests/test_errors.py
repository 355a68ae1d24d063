"""Bad requests get INVALID_ARGUMENT naming the field; every project error maps to its status code."""

from __future__ import annotations

import io
import shutil
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from PIL import Image

from diffstack.errors import (
    Cancelled,
    DeadlineExceeded,
    DiffstackError,
    FieldViolation,
    InvalidRequest,
    ModelError,
    NotReady,
    OutOfMemory,
    Overloaded,
    PermissionDenied,
)
from diffstack_client import DiffstackClient, ServiceError, tls_credentials
from diffstack_client.v1 import generation_pb2, generation_pb2_grpc, types_pb2
from diffstack_server.interceptors import status_for
from diffstack_server.testing import make_certificate


def png_bytes(size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (10, 20, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


BAD_REQUESTS: list[tuple[str, dict[str, Any], str]] = [
    ("size not a multiple of 8", {"width": 60}, "spec.width"),
    ("height not a multiple of 8", {"height": 100}, "spec.height"),
    ("too many pixels", {"width": 2048, "height": 2048}, "spec.width"),
    ("too many steps", {"steps": 1000}, "spec.steps"),
    ("prompt too long", {"prompt": "a very long prompt " * 40}, "spec.prompt"),
    ("negative prompt too long", {"negative_prompt": "blurry " * 100}, "spec.negative_prompt"),
    ("unknown sampler", {"sampler": "heun_9000"}, "spec.sampler"),
    ("unknown schedule", {"schedule": "zigzag"}, "spec.schedule"),
    ("unknown model", {"model": "no-such-model"}, "spec.model"),
    ("model outside the models dir", {"model": "../etc"}, "spec.model"),
    ("too many images", {"num_images": 9}, "spec.num_images"),
    ("more seeds than images", {"seeds": [1, 2, 3]}, "spec.seeds"),
    ("guidance out of range", {"guidance": 99.0}, "spec.guidance"),
    ("unknown wrapper", {"wrappers": {"warp_drive": {}}}, "spec.wrappers"),
    ("image that is not an image", {"init_image": b"not an image"}, "spec.init_image"),
    ("image with too many pixels", {"init_image": png_bytes((1100, 1000))}, "spec.init_image"),
    ("strength out of range", {"init_image": png_bytes((64, 64)), "strength": 1.5}, "spec.strength"),
]


@pytest.mark.parametrize(("case", "params", "field"), BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_request_names_the_field(
    client: DiffstackClient, case: str, params: dict[str, Any], field: str
) -> None:
    prompt = params.pop("prompt", "a cube")
    with pytest.raises(ServiceError) as failure:
        client.generate(prompt, steps=params.pop("steps", 1), **params)
    error = failure.value
    assert error.code is grpc.StatusCode.INVALID_ARGUMENT, case
    assert field in error.violations, (case, error.violations)
    assert error.reason == "INVALID_REQUEST"
    assert error.request_id


def test_bad_request_on_the_stream(client: DiffstackClient) -> None:
    with pytest.raises(ServiceError) as failure:
        list(client.stream("a cube", steps=1, width=12))
    assert failure.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert "spec.width" in failure.value.violations


def test_raw_rgb_init_image_of_wrong_length(server: Any) -> None:
    request = generation_pb2.GenerateRequest(
        spec=types_pb2.GenerationSpec(
            prompt="a cube",
            init_image=types_pb2.Image(
                data=b"\0" * 10, format=types_pb2.IMAGE_FORMAT_RAW_RGB, width=8, height=8
            ),
        )
    )
    with grpc.insecure_channel(server.target) as channel, pytest.raises(grpc.RpcError) as failure:
        generation_pb2_grpc.GenerationServiceStub(channel).Generate(request, timeout=30)
    status = rpc_status.from_call(failure.value)
    assert status is not None and status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    bad_request = error_details_pb2.BadRequest()
    assert any(d.Unpack(bad_request) for d in status.details)
    assert [v.field for v in bad_request.field_violations] == ["spec.init_image"]


def test_bad_output_options(client: DiffstackClient) -> None:
    with pytest.raises(ServiceError) as failure:
        client.generate("a cube", steps=1, image_format="jpeg", quality=101)
    assert failure.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert "output.quality" in failure.value.violations


def test_every_violation_is_reported_at_once(client: DiffstackClient) -> None:
    with pytest.raises(ServiceError) as failure:
        client.generate("a cube", width=7, steps=1000, sampler="nope")
    assert {"spec.width", "spec.steps", "spec.sampler"} <= set(failure.value.violations)


def test_message_over_the_size_limit(start_server: Any, spy: Any) -> None:
    server = start_server(spy, limits={"max_message_bytes": 4096})
    with DiffstackClient(server.target, timeout=30) as client, pytest.raises(ServiceError) as failure:
        client.generate("a cube", steps=1, init_image=b"\xff" * 10_000)
    assert failure.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.mark.parametrize(
    ("error", "code", "reason"),
    [
        (
            InvalidRequest(FieldViolation("spec.width", "bad")),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_REQUEST",
        ),
        (Overloaded("full"), grpc.StatusCode.RESOURCE_EXHAUSTED, "OVERLOADED"),
        (OutOfMemory("oom"), grpc.StatusCode.RESOURCE_EXHAUSTED, "OUT_OF_MEMORY"),
        (NotReady("starting"), grpc.StatusCode.UNAVAILABLE, "NOT_READY"),
        (Cancelled("gone"), grpc.StatusCode.CANCELLED, "CANCELLED"),
        (DeadlineExceeded("late"), grpc.StatusCode.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED"),
        (PermissionDenied("token"), grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED"),
        (ModelError("pickle"), grpc.StatusCode.FAILED_PRECONDITION, "MODEL_ERROR"),
        (DiffstackError("other"), grpc.StatusCode.INTERNAL, "INTERNAL"),
        (RuntimeError("secret detail"), grpc.StatusCode.INTERNAL, "INTERNAL"),
    ],
)
def test_status_mapping(error: Exception, code: grpc.StatusCode, reason: str) -> None:
    mapped, status = status_for(error, "rid-1")
    assert mapped is code and status.code == code.value[0]
    info = error_details_pb2.ErrorInfo()
    assert any(d.Unpack(info) for d in status.details)
    assert (info.reason, info.domain) == (reason, "diffstack")
    request = error_details_pb2.RequestInfo()
    assert any(d.Unpack(request) for d in status.details) and request.request_id == "rid-1"
    if code is grpc.StatusCode.INTERNAL:
        assert "secret" not in status.message and "rid-1" in status.message  # no internals leak


def test_an_overload_with_a_known_wait_carries_a_retry_hint() -> None:
    _, status = status_for(Overloaded("late", retry_after_s=1.25), "rid-1")
    retry = error_details_pb2.RetryInfo()
    assert any(d.Unpack(retry) for d in status.details)
    assert retry.retry_delay.ToTimedelta().total_seconds() == 1.25
    _, plain = status_for(Overloaded("full"), "rid-1")
    assert not any(d.Is(error_details_pb2.RetryInfo.DESCRIPTOR) for d in plain.details)
    seen = ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, status.message)
    seen._read_details([("grpc-status-details-bin", status.SerializeToString())])
    assert (seen.retry_after_s, seen.reason) == (1.25, "OVERLOADED")  # the client reads the hint


# -------------------------------------------------------------------------------------------------
# Admin token and TLS
# -------------------------------------------------------------------------------------------------


def test_admin_token_guards_diagnostics_only(start_server: Any, spy: Any) -> None:
    server = start_server(spy, server={"admin_token": "s3cret"})
    with DiffstackClient(server.target, timeout=30) as anonymous:
        with pytest.raises(ServiceError) as failure:
            anonymous.plugins()
        assert failure.value.code is grpc.StatusCode.PERMISSION_DENIED
        assert anonymous.generate("a cube", steps=1).images  # generation needs no token
        assert anonymous.health() == "SERVING"
    with (
        DiffstackClient(server.target, timeout=30, admin_token="wrong") as wrong,
        pytest.raises(ServiceError),
    ):
        wrong.stats()
    with DiffstackClient(server.target, timeout=30, admin_token="s3cret") as admin:
        assert admin.plugins() and admin.models() and admin.stack().slots
        assert admin.stats().requests_served == 1


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make certificates")
def test_tls_and_mutual_tls(start_server: Any, spy: Any, tmp_path: Path) -> None:
    ca_key, ca_cert = make_certificate(tmp_path, "test-ca")
    server_key, server_cert = make_certificate(tmp_path, "server", (ca_key, ca_cert))
    client_key, client_cert = make_certificate(tmp_path, "client", (ca_key, ca_cert))

    tls = start_server(spy, server={"tls_cert": server_cert, "tls_key": server_key})
    with DiffstackClient(tls.target, timeout=30, credentials=tls_credentials(ca=ca_cert)) as client:
        assert client.generate("a cube", steps=1).images
    with DiffstackClient(tls.target, timeout=5) as plaintext, pytest.raises(ServiceError) as failure:
        plaintext.health()
    assert failure.value.code is grpc.StatusCode.UNAVAILABLE

    mtls = start_server(
        spy, server={"tls_cert": server_cert, "tls_key": server_key, "tls_client_ca": ca_cert}
    )
    with DiffstackClient(
        mtls.target, timeout=30, credentials=tls_credentials(ca=ca_cert, cert=client_cert, key=client_key)
    ) as client:
        assert client.health() == "SERVING"
    without_certificate = tls_credentials(ca=ca_cert)
    with (
        DiffstackClient(mtls.target, timeout=5, credentials=without_certificate) as no_cert,
        pytest.raises(ServiceError) as failure,
    ):
        no_cert.health()
    assert failure.value.code is grpc.StatusCode.UNAVAILABLE
