"""The client's own logic, without a server: request building, results and error details."""

from __future__ import annotations

import io
from pathlib import Path

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from PIL import Image

from diffstack_client import GeneratedImage, Generation, ServiceError
from diffstack_client._common import build_spec, event_from_message, output_options
from diffstack_client.v1 import generation_pb2, types_pb2


def test_build_spec_sets_only_what_was_given() -> None:
    spec = build_spec("a cat", {"width": 512, "seed": 7, "seeds": [8], "guidance": 0.0, "strength": 0.5})
    assert (spec.prompt, spec.width, spec.height, list(spec.seeds)) == ("a cat", 512, 0, [7, 8])
    assert spec.HasField("guidance") and spec.guidance == 0.0  # zero guidance is not "unset"
    assert spec.HasField("strength") and not spec.HasField("init_image")
    assert not build_spec("a cat", {}).HasField("guidance")


def test_build_spec_wrappers_keep_their_value_types() -> None:
    spec = build_spec(
        "a cat", {"wrappers": {"deepcache": {"interval": 3, "ratio": 0.5, "on": True, "mode": "x"}}}
    )
    options = spec.wrappers["deepcache"].options
    assert options["interval"].int_value == 3
    assert options["ratio"].double_value == 0.5
    assert options["on"].bool_value is True
    assert options["mode"].string_value == "x"
    assert "first_block_cache" in build_spec("a", {"wrappers": {"first_block_cache": {}}}).wrappers


def test_build_spec_image_options_from_pil_bytes_or_path(tmp_path: Path) -> None:
    picture = Image.new("RGB", (6, 4), (9, 8, 7))
    path = tmp_path / "ref.png"
    picture.save(path)

    def sent(value: object) -> bytes:
        options = build_spec("a", {"wrappers": {"w": {"image": value}}}).wrappers["w"].options  # type: ignore[dict-item]
        assert options["image"].WhichOneof("kind") == "image_value"
        return options["image"].image_value.data

    assert Image.open(io.BytesIO(sent(picture))).getpixel((0, 0)) == (9, 8, 7)
    assert sent(path) == sent(path.read_bytes()) == path.read_bytes()
    assert (
        build_spec("a", {"wrappers": {"w": {"image": str(path)}}}).wrappers["w"].options["image"].string_value
    )
    with pytest.raises(TypeError, match="expected bool, int, float, str"):
        sent(None)


def test_build_spec_init_image_from_pil_bytes_or_path(tmp_path: Path) -> None:
    picture = Image.new("RGB", (16, 8), (1, 2, 3))
    from_pil = build_spec("a", {"init_image": picture}).init_image
    assert Image.open(io.BytesIO(from_pil.data)).size == (16, 8)
    path = tmp_path / "start.png"
    path.write_bytes(from_pil.data)
    assert build_spec("a", {"init_image": path}).init_image.data == from_pil.data
    assert build_spec("a", {"init_image": from_pil.data}).init_image.data == from_pil.data


def test_unknown_parameter_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="colour"):
        build_spec("a", {"colour": "red"})  # type: ignore[typeddict-unknown-key]
    with pytest.raises(ValueError, match="image_format must be one of"):
        output_options("gif", None)  # type: ignore[arg-type]


class FakeRpcError(grpc.RpcError):
    def __init__(self, metadata: tuple[tuple[str, bytes], ...]) -> None:
        self._metadata = metadata

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.INVALID_ARGUMENT

    def details(self) -> str:
        return "spec.width: bad"

    def trailing_metadata(self) -> tuple[tuple[str, bytes], ...]:
        return self._metadata


def test_service_error_unpacks_google_rpc_details() -> None:
    status = status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message="spec.width: bad")
    for detail in (
        error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field="spec.width", description="bad")
            ]
        ),
        error_details_pb2.ErrorInfo(reason="INVALID_REQUEST", domain="diffstack"),
        error_details_pb2.RequestInfo(request_id="abc"),
    ):
        packed = any_pb2.Any()
        packed.Pack(detail)
        status.details.append(packed)
    error = ServiceError.from_rpc_error(
        FakeRpcError((("grpc-status-details-bin", status.SerializeToString()),))
    )
    assert error.code is grpc.StatusCode.INVALID_ARGUMENT
    assert error.violations == {"spec.width": "bad"}
    assert (error.reason, error.request_id) == ("INVALID_REQUEST", "abc")
    assert str(error) == "INVALID_ARGUMENT: spec.width: bad (request id abc)"
    assert isinstance(error, grpc.RpcError)
    assert ServiceError.from_rpc_error(FakeRpcError(())).violations == {}


def test_results_save_with_their_seeds(tmp_path: Path) -> None:
    raw = GeneratedImage(bytes(4 * 2 * 3), "raw_rgb", 4, 2, seed=9)
    result = Generation(images=[raw], model="m", stack={}, timings={})
    (path,) = result.save(tmp_path / "out")
    assert path.name == "image-9.png"
    assert Image.open(path).size == (4, 2)


def test_stream_events_from_messages() -> None:
    message = generation_pb2.GenerateStreamResponse(
        preview=generation_pb2.PreviewEvent(
            step=2, images=[types_pb2.Image(data=b"x", format=types_pb2.IMAGE_FORMAT_JPEG, width=1, height=1)]
        )
    )
    event = event_from_message(message)
    assert event.step == 2 and event.images[0].format == "jpeg"  # type: ignore[union-attr]


def test_a_spec_carries_its_loras_in_order() -> None:
    spec = build_spec("a red circle", {"loras": {"b": 0.5, "a": 1.0}})
    assert [(lora.name, lora.scale) for lora in spec.loras] == [("b", 0.5), ("a", 1.0)]
