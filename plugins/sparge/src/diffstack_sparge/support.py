"""Whether SpargeAttn can run here and which shapes it serves, decided without importing it
(except in the probe)."""

from __future__ import annotations

import importlib.metadata
import importlib.util

from diffstack import AttentionFn, AttentionShape, Availability, ModelInfo
from diffstack_sparge.config import SpargeConfig

MODULE = "spas_sage_attn"
HEAD_DIMS = (64, 128)
MIN_TOKENS = 128
"""The kernels assert ≥128 queries; with fewer keys there are at most two key blocks to choose from."""
CAPABILITIES = ((8, 0), (9, 0))
"""The compute capabilities upstream's build accepts (8.0, 8.6, 8.7, 8.9, 9.0)."""


def installed() -> bool:
    return importlib.util.find_spec(MODULE) is not None


def _version() -> str:
    try:
        return importlib.metadata.version(MODULE)
    except importlib.metadata.PackageNotFoundError:
        return "(unknown version)"


def probe(model: ModelInfo) -> Availability:
    try:
        SpargeConfig.from_options(model.plugin_options("sparge"))
    except (TypeError, ValueError) as exc:
        return Availability.no(f"bad [plugins.options.sparge]: {exc}")
    if not model.is_cuda:
        return Availability.no(f"needs CUDA compute capability 8.0-9.0, found {model.device}")
    if not installed():
        return Availability.no(
            "spas_sage_attn not installed (not on PyPI: build thu-ml/SpargeAttn from source)"
        )
    import torch

    capability = torch.cuda.get_device_capability(model.device)
    if not CAPABILITIES[0] <= capability <= CAPABILITIES[1]:
        return Availability.no(
            f"needs CUDA compute capability 8.0-9.0, found {capability[0]}.{capability[1]}"
        )
    try:
        import spas_sage_attn  # noqa: F401  (a build for another torch or GPU fails here, not mid-request)
    except Exception as exc:
        return Availability.no(f"spas_sage_attn {_version()} is installed but does not import: {exc}")
    return Availability.yes(f"spas_sage_attn {_version()}")


def supports(shape: AttentionShape) -> Availability:
    if shape.head_dim not in HEAD_DIMS:
        return Availability.no(
            f"SpargeAttn supports head dims 64 and 128; {shape.head_dim} stays with the next offer"
        )
    if min(shape.query_len, shape.key_len) < MIN_TOKENS:
        return Availability.no(
            f"SpargeAttn needs ≥{MIN_TOKENS} query and key tokens, got q{shape.query_len} k{shape.key_len}; "
            "it stays with the next offer"
        )
    return Availability.yes()


def build(model: ModelInfo) -> AttentionFn:
    from diffstack_sparge.kernel import sparge_attention

    return sparge_attention(SpargeConfig.from_options(model.plugin_options("sparge")))
