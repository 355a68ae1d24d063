"""Translation between the wire messages (diffstack.v1) and the engine's types.

Everything here is pure and synchronous; image encoding and decoding are CPU work that callers run in
a thread pool. Field violations name the field as the client spelled it in the message (``spec.width``).
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from PIL import Image as PILImage

from diffstack.engine.requests import LoraSpec
from diffstack.errors import FieldViolation, InvalidRequest
from diffstack.option_schema import OptionSpec, option_schema
from diffstack.profiles import BUILTIN_PROFILES, Profile, apply_profile, blame_profile
from diffstack_client.v1 import diagnostics_pb2, generation_pb2, types_pb2

if TYPE_CHECKING:
    from diffstack.config import Limits
    from diffstack.engine import GenerationRequest, GenerationResult, LoraListing, ModelListing
    from diffstack.types import DenoiserWrapperOffer, PluginRecord, StackReport

SPEC = "spec"
DEFAULT_QUALITY = 90
MAX_WEBP_EFFORT = 6
# PNG level 1 is lossless like level 6 but several times faster to write; a generation server spends
# its CPU on the pipeline, not on squeezing a few percent more out of the file.
PNG_COMPRESS_LEVEL = 1
_PIL_FORMATS: dict[int, str] = {
    types_pb2.IMAGE_FORMAT_PNG: "PNG",
    types_pb2.IMAGE_FORMAT_WEBP: "WEBP",
    types_pb2.IMAGE_FORMAT_JPEG: "JPEG",
}
_DECODABLE = ("PNG", "JPEG", "WEBP")
_WEIGHTS = {"random": diagnostics_pb2.MODEL_WEIGHTS_RANDOM, "trained": diagnostics_pb2.MODEL_WEIGHTS_TRAINED}


# -------------------------------------------------------------------------------------------------
# Requests
# -------------------------------------------------------------------------------------------------


def request_from_spec(
    spec: types_pb2.GenerationSpec, limits: Limits, profiles: Mapping[str, Profile] = BUILTIN_PROFILES
) -> GenerationRequest:
    """The engine request a ``GenerationSpec`` asks for (decodes the init image; the engine validates):
    the fields it sets over its named profile's defaults (an unknown profile is ``spec.profile``)."""
    from diffstack.engine import GenerationRequest  # torch and diffusers load with the engine, not before

    try:
        fields = apply_profile(explicit_fields(spec), spec.profile, profiles)
    except InvalidRequest as error:
        raise in_spec(error) from None
    if "wrappers" in fields:
        fields["wrappers"] = _decoded_options(fields["wrappers"], limits)
    if spec.HasField("init_image"):
        fields["init_image"] = decode_image(spec.init_image, limits, field=f"{SPEC}.init_image")
    if spec.HasField("mask"):
        fields["mask"] = decode_image(spec.mask, limits, field=f"{SPEC}.mask")
    return GenerationRequest(**fields)


def explicit_fields(spec: types_pb2.GenerationSpec) -> dict[str, Any]:
    """The request fields ``spec`` sets, images aside; unset ones stay out, so a profile's defaults,
    then the request type's own (auto schedule, one image, ...), apply."""
    maybe: dict[str, Any] = {
        "negative_prompt": spec.negative_prompt,
        "model": spec.model,
        "width": spec.width,
        "height": spec.height,
        "steps": spec.steps,
        "sampler": spec.sampler,
        "schedule": spec.schedule,
        "num_images": spec.num_images,
        "seeds": tuple(spec.seeds),
        "wrappers": {name: _options(w.options) for name, w in spec.wrappers.items()},
        "loras": tuple(
            LoraSpec(lora.name, lora.scale if lora.HasField("scale") else LoraSpec.scale)
            for lora in spec.loras
        ),
    }
    fields = {"prompt": spec.prompt, **{name: value for name, value in maybe.items() if value}}
    for optional in ("guidance", "strength"):
        if spec.HasField(optional):
            fields[optional] = getattr(spec, optional)
    return fields


def profile_refusal(error: InvalidRequest, spec: types_pb2.GenerationSpec) -> InvalidRequest:
    """``error`` with what the engine refused of the spec's profile (not of the spec) on ``profile``."""
    return blame_profile(error, spec.profile, explicit_fields(spec))


def _options(options: Mapping[str, types_pb2.OptionValue]) -> dict[str, Any]:
    """Option values as sent; a picture stays an ``Image`` message (:func:`_decoded_options`)."""
    values: dict[str, Any] = {}
    for key, value in options.items():
        kind = value.WhichOneof("kind")
        if kind is not None:
            values[key] = getattr(value, kind)
    return values


def _decoded_options(wrappers: Mapping[str, Mapping[str, Any]], limits: Limits) -> dict[str, dict[str, Any]]:
    """``wrappers`` with every picture option decoded and checked as ``init_image`` is (format, pixel
    limit before decoding, damaged data), a problem named ``spec.wrappers.<wrapper>.<option>``."""
    return {
        name: {
            key: decode_image(value, limits, field=f"{SPEC}.wrappers.{name}.{key}")
            if isinstance(value, types_pb2.Image)
            else value
            for key, value in options.items()
        }
        for name, options in wrappers.items()
    }


def in_spec(error: InvalidRequest) -> InvalidRequest:
    """The engine's violations (named after request fields) renamed to their path in the message."""
    return InvalidRequest([FieldViolation(f"{SPEC}.{v.field}", v.description) for v in error.violations])


def check_output(output: types_pb2.OutputOptions, field: str = "output") -> None:
    """Raise :class:`InvalidRequest` for an output format or quality the server cannot produce."""
    violations = []
    if output.format not in types_pb2.ImageFormat.values():
        violations.append(FieldViolation(f"{field}.format", f"unknown image format {output.format}"))
    if output.HasField("quality") and not 1 <= output.quality <= 100:
        violations.append(FieldViolation(f"{field}.quality", "must be between 1 and 100"))
    if output.HasField("effort") and output.effort > MAX_WEBP_EFFORT:
        violations.append(FieldViolation(f"{field}.effort", f"must be between 0 and {MAX_WEBP_EFFORT}"))
    if violations:
        raise InvalidRequest(violations)


def check_previews(previews: generation_pb2.PreviewOptions) -> None:
    """Raise :class:`InvalidRequest` for a preview format the server cannot produce."""
    if previews.format not in types_pb2.ImageFormat.values():
        raise InvalidRequest(FieldViolation("previews.format", f"unknown image format {previews.format}"))


# -------------------------------------------------------------------------------------------------
# Images
# -------------------------------------------------------------------------------------------------


def decode_image(message: types_pb2.Image, limits: Limits, field: str) -> PILImage.Image:
    """An RGB picture from an ``Image`` message; refuses formats, sizes and bytes that do not fit."""
    if message.format == types_pb2.IMAGE_FORMAT_RAW_RGB:
        width, height = message.width, message.height
        if width * height == 0 or len(message.data) != width * height * 3:
            raise InvalidRequest(
                FieldViolation(field, "raw RGB needs width and height and exactly width*height*3 bytes")
            )
        _check_pixels(width, height, limits, field)
        return PILImage.frombytes("RGB", (width, height), message.data)
    if not message.data:
        raise InvalidRequest(FieldViolation(field, "the image has no data"))
    try:
        picture = PILImage.open(io.BytesIO(message.data), formats=_DECODABLE)
    except Exception as exc:
        raise InvalidRequest(FieldViolation(field, f"not a PNG, JPEG or WebP image ({exc})")) from None
    _check_pixels(picture.width, picture.height, limits, field)  # before decoding: no pixel bombs
    try:
        return picture.convert("RGB")
    except Exception as exc:
        raise InvalidRequest(FieldViolation(field, f"the image data is damaged ({exc})")) from None


def _check_pixels(width: int, height: int, limits: Limits, field: str) -> None:
    if width * height > limits.max_pixels:
        raise InvalidRequest(
            FieldViolation(field, f"{width}x{height} is more than the limit of {limits.max_pixels} pixels")
        )


DEFAULT_WEBP_EFFORT = 2
"""libwebp's ``method``: on 512x512 pictures 2 took a third of the default 4's time for files within
5% of its size (PNG at level 1 took longer still; JPEG was ~30x faster than either)."""


@dataclass(frozen=True)
class EncodeOptions:
    """How to encode a picture: the format (UNSPECIFIED means PNG) and its codec's options."""

    format: int = types_pb2.IMAGE_FORMAT_PNG
    quality: int = DEFAULT_QUALITY
    effort: int = DEFAULT_WEBP_EFFORT
    lossless: bool = False

    @classmethod
    def from_output(cls, output: types_pb2.OutputOptions) -> EncodeOptions:
        return cls(
            format=output.format or types_pb2.IMAGE_FORMAT_PNG,
            quality=output.quality if output.HasField("quality") else DEFAULT_QUALITY,
            effort=output.effort if output.HasField("effort") else DEFAULT_WEBP_EFFORT,
            lossless=output.lossless,
        )


def encode_image(picture: PILImage.Image, options: EncodeOptions) -> types_pb2.Image:
    """An ``Image`` message holding ``picture`` encoded as ``options`` say."""
    rgb = picture if picture.mode == "RGB" else picture.convert("RGB")
    if options.format == types_pb2.IMAGE_FORMAT_RAW_RGB:
        data = rgb.tobytes()
    else:
        buffer = io.BytesIO()
        pil_format = _PIL_FORMATS[options.format]
        if pil_format == "PNG":
            rgb.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
        elif pil_format == "WEBP":
            rgb.save(
                buffer,
                format="WEBP",
                quality=options.quality,
                method=options.effort,
                lossless=options.lossless,
            )
        else:
            rgb.save(buffer, format=pil_format, quality=options.quality)
        data = buffer.getvalue()
    return types_pb2.Image(data=data, format=options.format, width=rgb.width, height=rgb.height)  # type: ignore[arg-type]


def result_message(
    result: GenerationResult, images: list[types_pb2.Image], extra_timings: Mapping[str, float]
) -> types_pb2.GenerationResult:
    """The wire form of an engine result whose pictures were encoded into ``images``, in order."""
    return types_pb2.GenerationResult(
        images=[
            types_pb2.GeneratedImage(image=image, seed=g.seed)
            for image, g in zip(images, result.images, strict=True)
        ],
        model=result.model,
        stack=[types_pb2.SlotChoice(slot=slot, chosen=list(chosen)) for slot, chosen in result.stack.items()],
        timings={**result.timings, **extra_timings},
    )


# -------------------------------------------------------------------------------------------------
# Diagnostics
# -------------------------------------------------------------------------------------------------


def plugin_message(
    record: PluginRecord, wrappers: Mapping[str, DenoiserWrapperOffer] | None = None
) -> diagnostics_pb2.Plugin:
    """``wrappers``: the wrapper offers this plugin made to loaded models, by name."""
    return diagnostics_pb2.Plugin(
        wrappers=[_wrapper_schema(name, offer) for name, offer in sorted((wrappers or {}).items())],
        name=record.name,
        distribution=record.distribution,
        version=record.version,
        entry_point=record.entry_point,
        hooks=list(record.hooks),
        # Wire enums spell each member as the core enum does (TIMED_OUT → PLUGIN_STATUS_TIMED_OUT).
        status=diagnostics_pb2.PluginStatus.Value(f"PLUGIN_STATUS_{record.status.name}"),
        error=record.error,
    )


def _wrapper_schema(name: str, offer: DenoiserWrapperOffer) -> diagnostics_pb2.WrapperSchema:
    description = offer.description
    try:
        options = option_schema(offer.options) if offer.options is not None else ()
    except Exception as exc:  # a declaration the schema cannot describe is reported, never fatal
        options, description = (), f"{description} (its options have no schema: {exc})".strip()
    return diagnostics_pb2.WrapperSchema(
        wrapper=name, description=description, options=[_option_schema(o) for o in options]
    )


def _option_schema(spec: OptionSpec) -> diagnostics_pb2.OptionSchema:
    return diagnostics_pb2.OptionSchema(
        name=spec.name,
        type=diagnostics_pb2.OptionType.Value(f"OPTION_TYPE_{spec.type.name}"),
        nullable=spec.nullable,
        default_value=None if spec.default is None else _option_value(spec.default),
        minimum=spec.minimum,
        exclusive_minimum=spec.exclusive_minimum,
        maximum=spec.maximum,
        exclusive_maximum=spec.exclusive_maximum,
        description=spec.description,
    )


def _option_value(value: bool | int | float | str) -> types_pb2.OptionValue:
    if isinstance(value, bool):
        return types_pb2.OptionValue(bool_value=value)
    if isinstance(value, int):
        return types_pb2.OptionValue(int_value=value)
    if isinstance(value, float):
        return types_pb2.OptionValue(double_value=value)
    return types_pb2.OptionValue(string_value=value)


def stack_message(report: StackReport) -> diagnostics_pb2.StackReport:
    return diagnostics_pb2.StackReport(
        model=report.model,
        family=str(report.family),
        device=report.device,
        dtype=report.dtype,
        measured=report.measured,
        restored=report.restored,
        decided_at=report.decided_at,
        notes=list(report.notes),
        slots=[
            diagnostics_pb2.SlotReport(
                slot=slot.slot,
                chosen=list(slot.chosen),
                candidates=[
                    diagnostics_pb2.Candidate(
                        plugin=c.plugin,
                        offer=c.offer,
                        priority=c.priority,
                        status=diagnostics_pb2.CandidateStatus.Value(f"CANDIDATE_STATUS_{c.status.name}"),
                        reason=c.reason,
                        scope=c.scope,
                        numeric_error=c.numeric_error,
                        time_ms=c.time_ms,
                        setup_s=c.setup_s,
                        notes=list(c.notes),
                    )
                    for c in slot.candidates
                ],
            )
            for slot in report.slots
        ],
    )


def model_message(listing: ModelListing) -> diagnostics_pb2.Model:
    return diagnostics_pb2.Model(
        name=listing.name,
        family=str(listing.family),
        loaded=listing.loaded,
        is_default=listing.default,
        weights=_WEIGHTS.get(listing.weights, diagnostics_pb2.MODEL_WEIGHTS_UNSPECIFIED),
        description=listing.description,
        device_memory_bytes=None if listing.memory is None else listing.memory.device_bytes,
        host_memory_bytes=None if listing.memory is None else listing.memory.host_bytes,
    )


def lora_message(listing: LoraListing) -> diagnostics_pb2.Lora:
    return diagnostics_pb2.Lora(
        name=listing.name,
        size_bytes=listing.size_bytes,
        rank=listing.rank,
        target_modules=listing.target_modules,
        base=listing.base,
        compatible_models=listing.compatible_models,
        problems=listing.problems,
    )
