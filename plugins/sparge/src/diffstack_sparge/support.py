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
KERNEL_FOR: dict[tuple[int, int], str] = {
    (8, 0): "qk_int8_sv_f16_accum_f16_block_sparse_attn_inst_buf_with_pv_threshold",
    (8, 6): "qk_int8_sv_f16_accum_f16_block_sparse_attn_inst_buf_with_pv_threshold",
    (8, 7): "qk_int8_sv_f16_accum_f16_block_sparse_attn_inst_buf_with_pv_threshold",
    (8, 9): "qk_int8_sv_f8_accum_f32_block_sparse_attn_inst_buf_fuse_v_scale_with_pv_threshold",
    (9, 0): "qk_int8_sv_f8_accum_f32_block_sparse_attn_inst_buf_fuse_v_scale_with_pv_threshold_sm90",
}
"""The compiled function ``spas_sage2_attn_meansim*_cuda`` calls per compute capability (upstream's
``core.py``; 8.9 may use an fp16-accumulating twin when built with CUDA ≥ 12.8). A build trimmed to
one family (``bench/build_kernels.sh`` builds only sm90's) lacks the others."""


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
        import spas_sage_attn.core  # a build for another torch or GPU fails here, not mid-request
    except Exception as exc:
        return Availability.no(f"spas_sage_attn {_version()} is installed but does not import: {exc}")
    import torch

    capability = torch.cuda.get_device_capability(model.device)
    needed = KERNEL_FOR.get(capability)
    if needed is None or not hasattr(spas_sage_attn.core.qattn, needed):
        return Availability.no(
            f"spas_sage_attn {_version()} was built without the kernel for compute capability "
            f"{capability[0]}.{capability[1]} ({needed or 'none known'})"
        )
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
