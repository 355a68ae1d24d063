"""Whether SpargeAttn can run here and which shapes it serves, decided without importing it
(except in the probe)."""

from __future__ import annotations

import importlib.metadata

from diffstack import (
    AttentionFn,
    AttentionShape,
    Availability,
    ModelInfo,
    OptionsError,
    all_of,
    head_dim_in,
    needs_cuda,
    needs_module,
    parse_options,
)
from diffstack_sparge.config import SpargeConfig

MODULE = "spas_sage_attn"
HEAD_DIMS = (64, 128)
MIN_TOKENS = 128
"""The kernels assert ≥128 queries; with fewer keys there are at most two key blocks to choose from."""
CAPABILITIES = ((8, 0), (9, 0))
"""The compute capabilities upstream's build accepts (8.0, 8.6, 8.7, 8.9, 9.0)."""


def _version() -> str:
    try:
        return importlib.metadata.version(MODULE)
    except importlib.metadata.PackageNotFoundError:
        return "(unknown version)"


def probe(model: ModelInfo) -> Availability:
    try:
        parse_options(SpargeConfig, model.plugin_options("sparge"))
    except OptionsError as exc:
        return Availability.no(f"bad [plugins.options.sparge]: {exc}")
    answer = all_of(
        lambda: needs_cuda(model),
        lambda: needs_module(MODULE, "not on PyPI: build thu-ml/SpargeAttn from source"),
        lambda: needs_cuda(model, *CAPABILITIES),
    )
    if not answer.ok:
        return answer
    try:
        import spas_sage_attn  # noqa: F401  (a build for another torch or GPU fails here, not mid-request)
    except Exception as exc:
        return Availability.no(f"spas_sage_attn {_version()} is installed but does not import: {exc}")
    return Availability.yes(f"spas_sage_attn {_version()}")


def supports(shape: AttentionShape) -> Availability:
    answer = head_dim_in(shape, HEAD_DIMS, "SpargeAttn")
    if not answer.ok:
        return answer
    if min(shape.query_len, shape.key_len) < MIN_TOKENS:
        return Availability.no(
            f"SpargeAttn needs ≥{MIN_TOKENS} query and key tokens, got q{shape.query_len} k{shape.key_len}; "
            "it stays with the next offer"
        )
    return Availability.yes()


def build(model: ModelInfo) -> AttentionFn:
    from diffstack_sparge.kernel import sparge_attention

    return sparge_attention(parse_options(SpargeConfig, model.plugin_options("sparge")))
