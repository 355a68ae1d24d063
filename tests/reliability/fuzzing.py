"""Hostile clients, as hypothesis strategies: every field of every request, and raw bytes.

Shared by the CI fuzz test (``test_fuzz.py``, a few thousand requests) and the 10,000-request run
against a real server process (``fuzz_soak.py``). A *call* is one RPC: its method, the request bytes
(a message drawn field by field, a valid message with damaged bytes, or bytes of no message at all)
and a deadline. :func:`send` makes the call and answers the status code's name.

The server must never answer INTERNAL or UNKNOWN: every other code is a legitimate answer to a
hostile request (INVALID_ARGUMENT for bad fields, RESOURCE_EXHAUSTED when the queue is full,
DEADLINE_EXCEEDED when the short deadline passes, FAILED_PRECONDITION for a model that cannot load).
"""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
from hypothesis import strategies as st
from PIL import Image

from diffstack_client.v1 import diagnostics_pb2, generation_pb2, types_pb2

FORBIDDEN = frozenset({"INTERNAL", "UNKNOWN"})
GENERATE = "/diffstack.v1.GenerationService/Generate"
GENERATE_STREAM = "/diffstack.v1.GenerationService/GenerateStream"
GET_STACK = "/diffstack.v1.DiagnosticsService/GetStack"
LIST_METHODS = (
    "/diffstack.v1.DiagnosticsService/ListPlugins",
    "/diffstack.v1.DiagnosticsService/ListModels",
    "/diffstack.v1.DiagnosticsService/GetStats",
    "/diffstack.v1.DiagnosticsService/FreeMemory",
    "/diffstack.v1.DiagnosticsService/ListLoras",
    "/diffstack.v1.GenerationService/ListJobs",
)
SUBMIT_JOB = "/diffstack.v1.GenerationService/SubmitJob"
WATCH_JOB = "/diffstack.v1.GenerationService/WatchJob"
CANCEL_JOB = "/diffstack.v1.GenerationService/CancelJob"
MODEL_METHODS = ("/diffstack.v1.DiagnosticsService/LoadModel", "/diffstack.v1.DiagnosticsService/UnloadModel")
STREAMING = frozenset({GENERATE_STREAM, WATCH_JOB})
ADMIN_TOKEN = "fuzz-admin-token"
"""The servers under fuzz require it on DiagnosticsService; every call sends it, so the admin RPCs
(loading and unloading models by hostile names) are fuzzed too, not only refused."""
ADMIN_METADATA = (("authorization", f"Bearer {ADMIN_TOKEN}"),)

UINT32 = 2**32 - 1
UINT64 = 2**64 - 1
INT64 = 2**63


@dataclass(frozen=True)
class Call:
    """One RPC to make: the method, the request's bytes, the deadline in seconds."""

    method: str
    payload: bytes
    timeout: float

    def __repr__(self) -> str:  # hypothesis prints failing examples; keep them readable
        return f"Call({self.method.rsplit('/', 1)[-1]}, {len(self.payload)} bytes, {self.payload[:80]!r})"


# -------------------------------------------------------------------------------------------------
# Field values: the legitimate, the edge and the hostile
# -------------------------------------------------------------------------------------------------


def _picture(image_format: str, size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buffer, format=image_format)
    return buffer.getvalue()


SMALL_PNG = _picture("PNG", (64, 64))
SMALL_JPEG = _picture("JPEG", (64, 64))
PIXEL_BOMB_PNG = _picture("PNG", (4000, 4000))  # compresses to a few KB, 16 megapixels decoded

texts = st.one_of(
    st.text(max_size=24),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=300),
    st.builds(
        lambda word, n: word * n,
        st.sampled_from(["a ", "é", "\x00", "🙂", "red circle "]),
        st.integers(1, 3000),
    ),
)
prompts = st.one_of(
    st.sampled_from(["a red circle", "a small blue square at the top left on a white background", ""]),
    texts,
)
model_names = st.one_of(
    st.sampled_from(
        [
            "",
            "tiny-sd1",
            "./tiny-sd1",
            "tiny-sd1/",
            "tiny-sd1/.",
            ".//tiny-sd1",
            "TINY-SD1",
            "../tiny-sd1",
            "..",
            ".",
            "/",
            "/etc/passwd",
            "tiny-sd1\x00",
            "a" * 300,
            "m/" * 200,
            "model.ckpt",
            "model.safetensors",
            "~",
            "$HOME",
            "con",
        ]
    ),
    texts,
)
samplers = st.one_of(
    st.sampled_from(
        ["", "euler", "euler_a", "dpmpp_2m", "ddim", "unipc", "flow_euler", "euler_cfgpp", "dpmpp_2m_cfgpp"]
    ),
    texts,
)
profiles = st.one_of(st.sampled_from(["", "speed", "balanced", "quality", "production"]), texts)
schedules = st.one_of(st.sampled_from(["", "auto", "default", "karras", "ays"]), texts)
uint32s = st.one_of(
    st.sampled_from([0, 1, 7, 8, 16, 24, 32, 56, 64, 72, 128, 4096, UINT32]), st.integers(0, UINT32)
)
small_uint32s = st.one_of(st.sampled_from([0, 1, 2, 3, 4, 9, 1000, UINT32]), st.integers(0, UINT32))
floats32 = st.floats(width=32, allow_nan=True, allow_infinity=True)
optional_floats = st.one_of(st.none(), st.sampled_from([0.0, 1.0, 7.5, -1.0, 1e30]), floats32)
enum_values = st.one_of(st.sampled_from(list(types_pb2.ImageFormat.values())), st.integers(-5, 1000))
option_values = st.one_of(
    st.builds(lambda v: types_pb2.OptionValue(int_value=v), st.integers(-INT64, INT64 - 1)),
    st.builds(
        lambda v: types_pb2.OptionValue(double_value=v), st.floats(allow_nan=True, allow_infinity=True)
    ),
    st.builds(lambda v: types_pb2.OptionValue(bool_value=v), st.booleans()),
    st.builds(lambda v: types_pb2.OptionValue(string_value=v), texts),
    st.builds(
        lambda data: types_pb2.OptionValue(image_value=types_pb2.Image(data=data)), st.binary(max_size=64)
    ),
    st.just(types_pb2.OptionValue()),
)
wrapper_names = st.one_of(st.sampled_from(["deepcache", "first_block_cache", "flaky"]), texts)
option_keys = st.one_of(st.sampled_from(["interval", "branch", "threshold", "cache_interval"]), texts)
wrappers = st.dictionaries(
    wrapper_names,
    st.builds(
        lambda options: types_pb2.WrapperOptions(options=options),
        st.dictionaries(option_keys, option_values, max_size=3),
    ),
    max_size=2,
)
image_data = st.one_of(
    st.sampled_from([SMALL_PNG, SMALL_JPEG, PIXEL_BOMB_PNG, b"", SMALL_PNG[:40], b"GIF89a" + bytes(20)]),
    st.binary(max_size=256),
)
init_images = st.one_of(
    st.none(),
    st.builds(types_pb2.Image, data=image_data, format=enum_values, width=uint32s, height=uint32s),
    st.builds(  # raw RGB whose length matches (or nearly matches) its size
        lambda side, extra: types_pb2.Image(
            data=bytes(max(0, side * side * 3 + extra)),
            format=types_pb2.IMAGE_FORMAT_RAW_RGB,
            width=side,
            height=side,
        ),
        st.sampled_from([0, 1, 8, 64, 65]),
        st.sampled_from([0, 0, 1, -1]),
    ),
)


loras = st.lists(
    st.builds(
        types_pb2.LoraSpec,
        name=st.one_of(st.sampled_from(["colour-swap", "../colour-swap", "", "x.ckpt"]), texts),
        scale=st.one_of(st.sampled_from([0.0, 1.0, -4.0, 4.5]), floats32),
    ),
    max_size=5,
)


@st.composite
def specs(draw: st.DrawFn) -> types_pb2.GenerationSpec:
    """A ``GenerationSpec`` with every field drawn (optional ones present or not)."""
    spec = types_pb2.GenerationSpec(
        model=draw(model_names),
        prompt=draw(prompts),
        negative_prompt=draw(st.one_of(st.just(""), prompts)),
        width=draw(uint32s),
        height=draw(uint32s),
        steps=draw(small_uint32s),
        sampler=draw(samplers),
        schedule=draw(schedules),
        seeds=draw(st.lists(st.integers(0, UINT64), max_size=4)),
        num_images=draw(small_uint32s),
        profile=draw(profiles),
        loras=draw(loras),
    )
    for field, value in (("guidance", draw(optional_floats)), ("strength", draw(optional_floats))):
        if value is not None:
            setattr(spec, field, value)
    image = draw(init_images)
    if image is not None:
        spec.init_image.CopyFrom(image)
    mask = draw(init_images)
    if mask is not None:
        spec.mask.CopyFrom(mask)
    for name, options in draw(wrappers).items():
        spec.wrappers[name].CopyFrom(options)
    return spec


@st.composite
def outputs(draw: st.DrawFn) -> types_pb2.OutputOptions:
    output = types_pb2.OutputOptions(format=draw(enum_values))
    quality = draw(st.one_of(st.none(), st.integers(0, UINT32)))
    if quality is not None:
        output.quality = quality
    return output


previews = st.builds(
    generation_pb2.PreviewOptions, enabled=st.booleans(), max_side=uint32s, format=enum_values
)


def _generate(spec: types_pb2.GenerationSpec, output: types_pb2.OutputOptions) -> bytes:
    return generation_pb2.GenerateRequest(spec=spec, output=output).SerializeToString()


def _stream(
    spec: types_pb2.GenerationSpec, output: types_pb2.OutputOptions, preview: generation_pb2.PreviewOptions
) -> bytes:
    return generation_pb2.GenerateStreamRequest(
        spec=spec, output=output, previews=preview
    ).SerializeToString()


@st.composite
def damaged(draw: st.DrawFn, payloads: st.SearchStrategy[bytes]) -> bytes:
    """A valid message's bytes with a few bytes flipped, cut or inserted."""
    data = bytearray(draw(payloads))
    for _ in range(draw(st.integers(1, 4))):
        where = draw(st.integers(0, len(data)))
        action = draw(st.sampled_from(["flip", "cut", "insert"]))
        if action == "flip" and where < len(data):
            data[where] ^= draw(st.integers(1, 255))
        elif action == "cut":
            del data[where:]
        else:
            data[where:where] = draw(st.binary(min_size=1, max_size=8))
    return bytes(data)


generate_payloads = st.builds(_generate, specs(), outputs())
stream_payloads = st.builds(_stream, specs(), outputs(), previews)
deadlines = st.sampled_from([0.05, 0.5, 2.0, 10.0])


def calls() -> st.SearchStrategy[Call]:
    """One fuzzed RPC: a drawn request, a damaged one, raw bytes, or a diagnostics call."""
    return st.one_of(
        st.builds(Call, st.just(GENERATE), generate_payloads, deadlines),
        st.builds(Call, st.just(GENERATE_STREAM), stream_payloads, deadlines),
        st.builds(Call, st.sampled_from([GENERATE, GENERATE_STREAM]), damaged(generate_payloads), deadlines),
        st.builds(
            Call,
            st.sampled_from([GENERATE, GENERATE_STREAM, SUBMIT_JOB, WATCH_JOB, CANCEL_JOB, *LIST_METHODS]),
            st.binary(max_size=64),
            deadlines,
        ),
        st.builds(
            Call,
            st.just(GET_STACK),
            st.builds(lambda m: diagnostics_pb2.GetStackRequest(model=m).SerializeToString(), model_names),
            deadlines,
        ),
        st.builds(Call, st.sampled_from(LIST_METHODS), st.just(b""), deadlines),
        st.builds(
            Call,
            st.sampled_from([WATCH_JOB, CANCEL_JOB]),
            st.builds(lambda j: generation_pb2.CancelJobRequest(job_id=j).SerializeToString(), model_names),
            deadlines,
        ),
        st.builds(
            Call,
            st.sampled_from(MODEL_METHODS),
            st.builds(lambda m: diagnostics_pb2.LoadModelRequest(model=m).SerializeToString(), model_names),
            deadlines,
        ),
    )


# -------------------------------------------------------------------------------------------------
# Making calls
# -------------------------------------------------------------------------------------------------


def send(channel: grpc.Channel, call: Call) -> str:
    """Make ``call`` (reading a stream to its end) and answer the status code's name."""
    try:
        if call.method in STREAMING:
            stream = channel.unary_stream(call.method, request_serializer=None, response_deserializer=None)
            for _ in stream(call.payload, timeout=call.timeout, metadata=ADMIN_METADATA):
                pass
        else:
            unary = channel.unary_unary(call.method, request_serializer=None, response_deserializer=None)
            unary(call.payload, timeout=call.timeout, metadata=ADMIN_METADATA)
    except grpc.RpcError as error:
        code = error.code()  # type: ignore[attr-defined]
        return code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
    return "OK"


def send_all(channel: grpc.Channel, batch: Iterable[Call], clients: int) -> list[tuple[Call, str]]:
    """Make every call of ``batch``, ``clients`` at a time; answer each call with its code."""
    batch = list(batch)
    with ThreadPoolExecutor(max_workers=clients) as pool:
        return list(zip(batch, pool.map(lambda call: send(channel, call), batch), strict=True))


def forbidden(outcomes: Iterable[tuple[Call, str]]) -> list[tuple[Call, str]]:
    return [(call, code) for call, code in outcomes if code in FORBIDDEN]


def rss_bytes(pid: int | str = "self") -> int:
    """Resident set size of a process (Linux), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def summary(codes: Counter[str]) -> str:
    return ", ".join(f"{code} {count}" for code, count in codes.most_common())
