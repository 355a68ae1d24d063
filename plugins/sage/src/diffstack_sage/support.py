"""What the installed SageAttention can do, answered without importing it (except in the probe).

The probe, ``supports`` and the diffusers backend name are decided from package metadata, the options
and the device, so listing offers never imports Triton or touches the GPU.
"""

from __future__ import annotations

from packaging.version import Version

from diffstack import (
    AttentionFn,
    AttentionShape,
    Availability,
    ModelInfo,
    OptionsError,
    all_of,
    needs_cuda,
    needs_distribution,
    parse_options,
)
from diffstack import installed_version as distribution_version
from diffstack_sage.config import AUTO_PICKS, KERNELS, SageConfig

DISTRIBUTION = "sageattention"
OPTIONS = "sage"
MAX_HEAD_DIM = 128
MIN_CAPABILITY = (8, 0)
INSTALL = "pip install sageattention: 1.0.6 on PyPI, 2.x built from source (see the plugin's README)"
V1_KEY_BLOCK = 64
"""sageattention 1.x walks keys in blocks of 64."""
DIFFUSERS_SAGE_MIN = Version("2.1.1")
"""diffusers 0.42's sage attention backends refuse older sageattention releases."""


def installed_version() -> Version | None:
    """The installed sageattention release, or ``None``; read from metadata, nothing imported."""
    return distribution_version(DISTRIBUTION)


def config_of(model: ModelInfo) -> SageConfig:
    return parse_options(SageConfig, model.plugin_options(OPTIONS))


def diffusers_backend(config: SageConfig) -> str | None:
    """diffusers' backend for the configured kernel where diffusers accepts the installed release (it
    serves FLUX), else ``None``."""
    version = installed_version()
    if version is None or version < DIFFUSERS_SAGE_MIN:
        return None
    return KERNELS[config.kernel].diffusers_backend


def probe(model: ModelInfo) -> Availability:
    try:
        config = config_of(model)
    except OptionsError as exc:
        return Availability.no(f"bad [plugins.options.sage]: {exc}")
    answer = all_of(
        lambda: needs_cuda(model),
        lambda: needs_distribution(DISTRIBUTION, install=INSTALL),
        lambda: needs_cuda(model, MIN_CAPABILITY),
    )
    if not answer.ok:
        return answer
    version = installed_version()
    assert version is not None  # needs_distribution said yes
    if version.major < 2 and config.kernel != "auto":
        return Availability.no(f"kernel = {config.kernel!r} needs sageattention 2.x, found {version}")
    if version.major >= 2:
        answer = _kernel_fits_gpu(model, config)
        if not answer.ok:
            return answer
    try:
        import sageattention  # noqa: F401  (a broken install, e.g. no Triton, fails here, not mid-request)
    except Exception as exc:
        return Availability.no(f"sageattention {version} is installed but does not import: {exc}")
    if version.major >= 2:
        return _kernel_was_built(model, config, version)
    return answer


def _effective_kernel(model: ModelInfo, config: SageConfig) -> str | None:
    """The 2.x kernel that serves ``config`` on this GPU (``auto``: what ``sageattn`` dispatches to)."""
    if config.kernel != "auto":
        return config.kernel
    import torch

    return AUTO_PICKS.get(torch.cuda.get_device_capability(model.device))


def _kernel_fits_gpu(model: ModelInfo, config: SageConfig) -> Availability:
    kernel = _effective_kernel(model, config)
    if kernel is None:
        import torch

        major, minor = torch.cuda.get_device_capability(model.device)
        return Availability.no(
            f"sageattn has no kernel for compute capability {major}.{minor}; "
            "set [plugins.options.sage] kernel = 'fp16_triton'"
        )
    return needs_cuda(model, *KERNELS[kernel].capabilities)


def _kernel_was_built(model: ModelInfo, config: SageConfig, version: Version) -> Availability:
    """A 2.x build may leave out compiled kernel families (e.g. an sm90-only build): say which."""
    import sageattention.core

    kernel = _effective_kernel(model, config)
    assert kernel is not None  # _kernel_fits_gpu said yes
    flag = KERNELS[kernel].extension
    if flag is not None and not getattr(sageattention.core, flag, False):
        return Availability.no(
            f"sageattention {version} was built without the kernel {KERNELS[kernel].function} needs "
            f"({flag} is false: its extension is missing or does not import)"
        )
    return Availability.yes(f"sageattention {version}, {KERNELS[kernel].function}")


def supports(shape: AttentionShape) -> Availability:
    if shape.head_dim > MAX_HEAD_DIM:
        return Availability.no(
            f"SageAttention supports head dims up to {MAX_HEAD_DIM}; "
            f"{shape.head_dim} stays with the next offer"
        )
    version = installed_version()
    if version is not None and version.major < 2 and shape.key_len % V1_KEY_BLOCK:
        # Its Triton kernel zero-fills the last partial key block but does not mask those scores, so
        # they take softmax weight: relative error ~0.28 at 77 keys on an H100 (measured). 2.x masks
        # them (its Triton kernel adds -1e6 past the key length; its CUDA kernels pad V to 128 keys).
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
    return sage_attention(version, config_of(model).kernel)
