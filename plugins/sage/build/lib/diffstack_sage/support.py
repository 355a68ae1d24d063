"""What the installed SageAttention can do, answered without importing it (except in the probe).

The probe, ``supports`` and the diffusers backend name are decided from package metadata and the
device, so listing offers never imports Triton or touches the GPU.
"""

from __future__ import annotations

from packaging.version import Version

from diffstack import (
    AttentionFn,
    AttentionShape,
    Availability,
    ModelInfo,
    all_of,
    needs_cuda,
    needs_distribution,
)
from diffstack import installed_version as distribution_version

DISTRIBUTION = "sageattention"
MAX_HEAD_DIM = 128
MIN_CAPABILITY = (8, 0)
INSTALL = "pip install sageattention: 1.0.6 on PyPI, 2.x from source"
V1_KEY_BLOCK = 64
"""sageattention 1.x walks keys in blocks of 64."""
DIFFUSERS_SAGE_MIN = Version("2.1.1")
"""diffusers 0.42's ``sage`` attention backend refuses older sageattention releases."""


def installed_version() -> Version | None:
    """The installed sageattention release, or ``None``; read from metadata, nothing imported."""
    return distribution_version(DISTRIBUTION)


def diffusers_backend() -> str | None:
    """``sage`` where diffusers' own backend accepts the installed release (it serves FLUX), else ``None``."""
    version = installed_version()
    return "sage" if version is not None and version >= DIFFUSERS_SAGE_MIN else None


def probe(model: ModelInfo) -> Availability:
    answer = all_of(
        lambda: needs_cuda(model),
        lambda: needs_distribution(DISTRIBUTION, install=INSTALL),
        lambda: needs_cuda(model, MIN_CAPABILITY),
    )
    if not answer.ok:
        return answer
    try:
        import sageattention  # noqa: F401  (a broken install, e.g. no Triton, fails here, not mid-request)
    except Exception as exc:
        return Availability.no(f"sageattention {installed_version()} is installed but does not import: {exc}")
    return answer


def supports(shape: AttentionShape) -> Availability:
    if shape.head_dim > MAX_HEAD_DIM:
        return Availability.no(
            f"SageAttention supports head dims up to {MAX_HEAD_DIM}; "
            f"{shape.head_dim} stays with the next offer"
        )
    version = installed_version()
    if version is not None and version.major < 2 and shape.key_len % V1_KEY_BLOCK:
        # Its Triton kernel zero-fills the last partial key block but does not mask those scores, so
        # they take softmax weight: relative error ~0.28 at 77 keys on an H100 (measured).
        return Availability.no(
            f"sageattention {version} gives wrong results unless the key length is a multiple of "
            f"{V1_KEY_BLOCK}; {shape.key_len} stays with the next offer"
        )
    return Availability.yes()


def build(model: ModelInfo) -> AttentionFn:
    from diffstack_sage.kernel import sage_attention

    version = installed_version()
    if version is None:
        raise RuntimeError("sageattention is not installed")
    return sage_attention(version)
