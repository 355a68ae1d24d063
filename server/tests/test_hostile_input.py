"""Bytes that are not a request, and requests built to blow up the status: INVALID_ARGUMENT, bounded."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from diffstack.errors import FieldViolation, InvalidRequest
from diffstack_client.v1 import types_pb2
from diffstack_server import BackgroundServer
from diffstack_server.interceptors import MAX_DETAILS_BYTES, MAX_MESSAGE_BYTES, status_for
from diffstack_server.testing import WAIT_S

METHODS = (
    ("/diffstack.v1.GenerationService/Generate", "unary"),
    ("/diffstack.v1.GenerationService/GenerateStream", "stream"),
    ("/diffstack.v1.DiagnosticsService/ListPlugins", "unary"),
    ("/diffstack.v1.DiagnosticsService/GetStack", "unary"),
)
GARBAGE = (
    b"\xff\xff\xff\xff",  # a field number of 0 / a truncated varint
    b"\x0a\x05abc",  # a length that runs past the end
    b"\x0f",  # an end-group tag that opens nothing
)
INVALID_UTF8_PROMPT = b"\x0a\x03\x0a\x01\xff"  # GenerateRequest.spec.prompt holding the byte 0xff


@pytest.fixture
def channel(server: BackgroundServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.target) as channel:
        yield channel


def call_raw(channel: grpc.Channel, method: str, kind: str, payload: bytes) -> grpc.RpcError:
    """Send ``payload`` as the request's bytes; return the error the server answered with."""
    if kind == "unary":
        call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as raised:
            call(payload, timeout=WAIT_S)
    else:
        stream = channel.unary_stream(method, request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as raised:
            list(stream(payload, timeout=WAIT_S))
    return raised.value


@pytest.mark.parametrize(("method", "kind"), METHODS)
@pytest.mark.parametrize("payload", GARBAGE)
def test_undecodable_request_bytes_are_invalid_argument(
    channel: grpc.Channel, method: str, kind: str, payload: bytes
) -> None:
    error = call_raw(channel, method, kind, payload)
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, error
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    bad = error_details_pb2.BadRequest()
    assert any(d.Unpack(bad) for d in status.details)
    assert bad.field_violations[0].field == "request"


@pytest.mark.parametrize(("method", "kind"), METHODS[:2])
def test_a_string_field_of_invalid_utf8_is_invalid_argument(
    channel: grpc.Channel, method: str, kind: str
) -> None:
    error = call_raw(channel, method, kind, INVALID_UTF8_PROMPT)
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, error


def test_a_huge_echoed_value_still_arrives_as_invalid_argument(channel: grpc.Channel) -> None:
    spec = types_pb2.GenerationSpec(prompt="a red circle", schedule="z" * 4000, sampler="é" * 3000)
    from diffstack_client.v1 import generation_pb2

    payload = generation_pb2.GenerateRequest(spec=spec).SerializeToString()
    error = call_raw(channel, "/diffstack.v1.GenerationService/Generate", "unary", payload)
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, error
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    assert len(status.message.encode()) <= MAX_MESSAGE_BYTES
    assert status.ByteSize() <= MAX_DETAILS_BYTES
    bad = error_details_pb2.BadRequest()
    assert any(d.Unpack(bad) for d in status.details)
    assert {v.field for v in bad.field_violations} >= {"spec.schedule"}


def test_status_for_bounds_every_echoed_value() -> None:
    violations = [FieldViolation(f"spec.field_{i}" + "x" * 500, "ü" * 5000) for i in range(200)]
    code, status = status_for(InvalidRequest(violations), "r" * 128)
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert len(status.message.encode()) <= MAX_MESSAGE_BYTES
    assert status.ByteSize() <= MAX_DETAILS_BYTES
    bad = error_details_pb2.BadRequest()
    assert any(d.Unpack(bad) for d in status.details)
    assert 0 < len(bad.field_violations) < 200, "trailing violations are dropped, the first ones kept"
    assert bad.field_violations[0].field.startswith("spec.field_0")
