"""What the sync and asyncio clients share: request building, results, events and errors."""

from __future__ import annotations

import io
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeAlias, TypedDict

import grpc
from google.rpc import error_details_pb2, status_pb2

from diffstack_client.v1 import generation_pb2, types_pb2

if TYPE_CHECKING:
    from PIL import Image as PILImage

DEFAULT_TARGET = "127.0.0.1:50051"
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
REQUEST_ID_HEADER = "x-request-id"
CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
)

ImageFormatName = Literal["png", "webp", "jpeg", "raw_rgb"]
_FORMATS: dict[str, int] = {
    "png": types_pb2.IMAGE_FORMAT_PNG,
    "webp": types_pb2.IMAGE_FORMAT_WEBP,
    "jpeg": types_pb2.IMAGE_FORMAT_JPEG,
    "raw_rgb": types_pb2.IMAGE_FORMAT_RAW_RGB,
}
_FORMAT_NAMES = {value: name for name, value in _FORMATS.items()}
_SUFFIXES = {"png": ".png", "webp": ".webp", "jpeg": ".jpg", "raw_rgb": ".png"}

OptionScalar = int | float | bool | str
# A wrapper option's value: a scalar, or for an image option a picture (encoded bytes, a file's path
# as a ``Path``, or a PIL image; a ``str`` is always a string option).
OptionInput: TypeAlias = "OptionScalar | bytes | Path | PILImage.Image"


class SpecParams(TypedDict, total=False):
    """Keyword arguments of ``generate``/``stream``; omitted ones take the model's defaults."""

    model: str
    negative_prompt: str
    width: int
    height: int
    steps: int
    guidance: float
    sampler: str
    schedule: str
    seed: int
    seeds: Sequence[int]
    num_images: int
    init_image: bytes | str | Path | PILImage.Image
    strength: float
    mask: bytes | str | Path | PILImage.Image
    wrappers: Mapping[str, Mapping[str, OptionInput]]
    profile: str
    loras: Mapping[str, float]
    """LoRAs by name (``client.loras()`` lists them) with their scales, e.g. ``{"colour-swap": 1.0}``."""


_SCALAR_FIELDS = (
    "model",
    "negative_prompt",
    "width",
    "height",
    "steps",
    "guidance",
    "sampler",
    "schedule",
    "num_images",
    "strength",
    "profile",
)


def build_spec(prompt: str, params: SpecParams) -> types_pb2.GenerationSpec:
    """The ``GenerationSpec`` for ``prompt`` and keyword parameters (``seed`` is one of ``seeds``)."""
    unknown = set(params) - set(SpecParams.__annotations__)
    if unknown:
        raise TypeError(f"unknown generation parameters: {', '.join(sorted(unknown))}")
    spec = types_pb2.GenerationSpec(prompt=prompt)
    for name in _SCALAR_FIELDS:
        if name in params:
            setattr(spec, name, params[name])  # type: ignore[literal-required]
    seeds = list(params.get("seeds", ()))
    if "seed" in params:
        seeds.insert(0, params["seed"])
    spec.seeds.extend(seeds)
    for name in ("init_image", "mask"):
        if name in params:
            getattr(spec, name).CopyFrom(_image_message(params[name]))  # type: ignore[literal-required]
    for name, options in params.get("wrappers", {}).items():
        wrapper = spec.wrappers[name]
        wrapper.SetInParent()
        for key, value in options.items():
            wrapper.options[key].CopyFrom(_option(value))
    spec.loras.extend(
        types_pb2.LoraSpec(name=name, scale=scale) for name, scale in params.get("loras", {}).items()
    )
    return spec


def outpaint(
    image: PILImage.Image, left: int = 0, top: int = 0, right: int = 0, bottom: int = 0
) -> tuple[PILImage.Image, PILImage.Image]:
    """``image`` padded by the given pixels on each side and the mask that repaints only the padding:
    pass them as ``init_image`` and ``mask`` (with ``strength=1.0``) to outpaint. The padding starts as
    the image's mean colour, so the model continues the picture rather than a black frame."""
    from PIL import Image, ImageStat

    if min(left, top, right, bottom) < 0:
        raise ValueError("padding must not be negative")
    rgb = image.convert("RGB")
    mean = tuple(round(channel) for channel in ImageStat.Stat(rgb).mean)
    size = (rgb.width + left + right, rgb.height + top + bottom)
    padded = Image.new("RGB", size, mean)
    padded.paste(rgb, (left, top))
    mask = Image.new("L", size, 255)
    mask.paste(0, (left, top, left + rgb.width, top + rgb.height))
    return padded, mask


def _option(value: OptionInput) -> types_pb2.OptionValue:
    if isinstance(value, bool):
        return types_pb2.OptionValue(bool_value=value)
    if isinstance(value, int):
        return types_pb2.OptionValue(int_value=value)
    if isinstance(value, float):
        return types_pb2.OptionValue(double_value=value)
    if isinstance(value, str):
        return types_pb2.OptionValue(string_value=value)
    if isinstance(value, bytes | Path) or hasattr(value, "convert"):  # convert: a PIL image
        return types_pb2.OptionValue(image_value=_image_message(value))
    raise TypeError(
        f"option value of type {type(value).__name__}: expected bool, int, float, str, "
        "or a picture (bytes, Path, PIL image)"
    )


def _image_message(image: Any) -> types_pb2.Image:
    if isinstance(image, bytes):
        return types_pb2.Image(data=image)
    if isinstance(image, str | Path):
        return types_pb2.Image(data=Path(image).read_bytes())
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return types_pb2.Image(data=buffer.getvalue(), format=types_pb2.IMAGE_FORMAT_PNG)


def output_options(
    image_format: ImageFormatName, quality: int | None, effort: int | None = None, lossless: bool = False
) -> types_pb2.OutputOptions:
    """``quality`` applies to WebP and JPEG; ``effort`` (0 fastest to 6 smallest) and ``lossless`` to
    WebP; unset values take the server's defaults."""
    if image_format not in _FORMATS:
        raise ValueError(f"image_format must be one of {', '.join(_FORMATS)}")
    output = types_pb2.OutputOptions(format=_FORMATS[image_format], lossless=lossless)  # type: ignore[arg-type]
    if quality is not None:
        output.quality = quality
    if effort is not None:
        output.effort = effort
    return output


def job_request(
    prompt: str,
    params: SpecParams,
    idempotency_key: str,
    previews: bool,
    image_format: ImageFormatName,
) -> generation_pb2.SubmitJobRequest:
    """The ``SubmitJobRequest`` both clients send for ``submit_job``."""
    return generation_pb2.SubmitJobRequest(
        request=generation_pb2.GenerateStreamRequest(
            spec=build_spec(prompt, params),
            output=output_options(image_format, None, None, False),
            previews=preview_options(previews, 0, "jpeg"),
        ),
        idempotency_key=idempotency_key,
    )


def preview_options(
    enabled: bool, max_side: int, image_format: ImageFormatName
) -> generation_pb2.PreviewOptions:
    return generation_pb2.PreviewOptions(
        enabled=enabled,
        max_side=max_side,
        format=_FORMATS[image_format],  # type: ignore[arg-type]
    )


# -------------------------------------------------------------------------------------------------
# Results and events
# -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Picture:
    """One image as the server sent it: encoded bytes (or raw RGB) and its size."""

    data: bytes
    format: str
    width: int
    height: int

    @classmethod
    def from_message(cls, message: types_pb2.Image) -> Picture:
        return cls(message.data, _FORMAT_NAMES.get(message.format, "png"), message.width, message.height)

    def to_pil(self) -> PILImage.Image:
        """The picture as a PIL image (needs pillow: ``pip install diffstack-client[images]``)."""
        from PIL import Image as PILImage

        if self.format == "raw_rgb":
            return PILImage.frombytes("RGB", (self.width, self.height), self.data)
        return PILImage.open(io.BytesIO(self.data))

    @property
    def suffix(self) -> str:
        return _SUFFIXES[self.format]

    def save(self, path: str | Path) -> Path:
        """Write the picture to ``path`` (a folder gets ``image<suffix>``); raw RGB is saved as PNG."""
        target = Path(path)
        if target.is_dir():
            target = target / f"image{self.suffix}"
        if self.format == "raw_rgb":
            self.to_pil().save(target, format="PNG")
        else:
            target.write_bytes(self.data)
        return target


@dataclass(frozen=True)
class GeneratedImage(Picture):
    """A generated image and the seed that reproduces it."""

    seed: int = 0


@dataclass(frozen=True)
class Generation:
    """The images of one request, the model and the stack that served it, and where time went."""

    images: list[GeneratedImage]
    model: str
    stack: dict[str, tuple[str, ...]]
    timings: dict[str, float]
    request_id: str = ""

    @classmethod
    def from_message(cls, message: types_pb2.GenerationResult, request_id: str = "") -> Generation:
        images = [
            GeneratedImage(
                g.image.data,
                _FORMAT_NAMES.get(g.image.format, "png"),
                g.image.width,
                g.image.height,
                seed=g.seed,
            )
            for g in message.images
        ]
        return cls(
            images=images,
            model=message.model,
            stack={s.slot: tuple(s.chosen) for s in message.stack},
            timings=dict(message.timings),
            request_id=request_id,
        )

    def save(self, folder: str | Path, stem: str = "image") -> list[Path]:
        """Write every image into ``folder`` as ``<stem>-<seed><suffix>``; returns the paths."""
        target = Path(folder)
        target.mkdir(parents=True, exist_ok=True)
        return [image.save(target / f"{stem}-{image.seed}{image.suffix}") for image in self.images]


@dataclass(frozen=True)
class Queued:
    """The request waits with ``position`` requests ahead of it."""

    position: int


@dataclass(frozen=True)
class Progress:
    """Step ``step`` of ``total`` finished."""

    step: int
    total: int


@dataclass(frozen=True)
class Preview:
    """Pictures of the work in progress at ``step``, one per requested image."""

    step: int
    images: list[Picture]


@dataclass(frozen=True)
class Finished:
    """The last event of a successful stream."""

    result: Generation


Event = Queued | Progress | Preview | Finished


def event_from_message(message: generation_pb2.GenerateStreamResponse, request_id: str = "") -> Event:
    kind = message.WhichOneof("event")
    if kind == "queued":
        return Queued(message.queued.position)
    if kind == "progress":
        return Progress(message.progress.step, message.progress.total)
    if kind == "preview":
        return Preview(message.preview.step, [Picture.from_message(i) for i in message.preview.images])
    if kind == "result":
        return Finished(Generation.from_message(message.result, request_id))
    raise ValueError(f"unknown stream event {kind!r}")


# -------------------------------------------------------------------------------------------------
# Errors
# -------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class ServiceError(grpc.RpcError):
    """A failed RPC with the server's ``google.rpc`` details unpacked.

    ``violations`` maps each bad request field (``spec.width``) to what is wrong with it.
    """

    code: grpc.StatusCode
    message: str
    violations: dict[str, str] = field(default_factory=dict)
    reason: str = ""
    request_id: str = ""
    retry_after_s: float | None = None
    """The server's hint (``google.rpc.RetryInfo``) of when a refused request could be taken."""

    def __str__(self) -> str:
        text = f"{self.code.name}: {self.message}"
        return f"{text} (request id {self.request_id})" if self.request_id else text

    @classmethod
    def from_rpc_error(cls, error: Any) -> ServiceError:
        """Unpack a ``grpc.RpcError`` or ``grpc.aio.AioRpcError``."""
        code = error.code() if callable(getattr(error, "code", None)) else grpc.StatusCode.UNKNOWN
        details = error.details() if callable(getattr(error, "details", None)) else str(error)
        trailing = error.trailing_metadata() if callable(getattr(error, "trailing_metadata", None)) else ()
        found = cls(code=code, message=details or "")
        found._read_details(trailing or ())
        return found

    def _read_details(self, metadata: Iterable[tuple[str, Any]]) -> None:
        raw = next((value for key, value in metadata if key == "grpc-status-details-bin"), None)
        if raw is None:
            return
        status = status_pb2.Status.FromString(raw)
        for detail in status.details:
            if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                self.violations.update({v.field: v.description for v in bad.field_violations})
            elif detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                self.reason = info.reason
            elif detail.Is(error_details_pb2.RequestInfo.DESCRIPTOR):
                request = error_details_pb2.RequestInfo()
                detail.Unpack(request)
                self.request_id = request.request_id
            elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                retry = error_details_pb2.RetryInfo()
                detail.Unpack(retry)
                self.retry_after_s = retry.retry_delay.ToTimedelta().total_seconds()


def metadata_value(metadata: Iterable[tuple[str, Any]] | None, key: str) -> str:
    for name, value in metadata or ():
        if name == key:
            return value.decode() if isinstance(value, bytes) else str(value)
    return ""


def tls_credentials(
    ca: str | Path | None = None, cert: str | Path | None = None, key: str | Path | None = None
) -> grpc.ChannelCredentials:
    """Channel credentials from PEM files: ``ca`` to trust the server, ``cert``+``key`` for mTLS."""

    def read(path: str | Path | None) -> bytes | None:
        return Path(path).read_bytes() if path is not None else None

    return grpc.ssl_channel_credentials(read(ca), read(key), read(cert))
