"""The real SageAttention kernel against float32 SDPA on the attention shapes of SD1.5, SDXL and FLUX.

Runs on a CUDA GPU with sageattention installed: ``pytest -m gpu plugins/sage`` (see the README).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from diffstack.types import AttentionShape, DenoiserKind, Family, ModelInfo
from diffstack_sage import support
from diffstack_sage.config import KERNELS

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(
        importlib.util.find_spec("sageattention") is None, reason="sageattention is not installed"
    ),
]

SHAPES = [
    AttentionShape(8, 40, 4096, 4096),  # SD1.5 self, padded to 64
    AttentionShape(8, 40, 4096, 77),  # SD1.5 cross (1.x: refused by supports)
    AttentionShape(8, 80, 1024, 1024),  # SD1.5 self, padded to 96 (1.x) or 128 (2.x)
    AttentionShape(10, 64, 4096, 4096),  # SDXL self
    AttentionShape(10, 64, 4096, 77),  # SDXL cross
    AttentionShape(24, 128, 4608, 4608),  # FLUX joint
]


@pytest.mark.parametrize("kernel", sorted(KERNELS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.key)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_sage_matches_sdpa_within_the_hosts_tolerance(
    shape: AttentionShape, dtype: torch.dtype, kernel: str
) -> None:
    options = {"sage": {"kernel": kernel}}
    model = ModelInfo("gpu-check", Family.SD1, DenoiserKind.UNET, "cuda", dtype, options=options)
    if kernel != "auto" and not support.probe(model).ok:  # 1.x, another GPU, or a trimmed build
        pytest.skip(support.probe(model).reason)
    assert support.probe(model).ok, support.probe(model).reason
    if not support.supports(shape).ok:
        pytest.skip(support.supports(shape).reason)
    generator = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (
        torch.randn(2, shape.heads, n, shape.head_dim, device="cuda", dtype=dtype, generator=generator)
        for n in (shape.query_len, shape.key_len, shape.key_len)
    )
    key_before = k.clone()

    out = support.build(model)(q, k, v)

    reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    error = ((out.float() - reference).norm() / reference.norm()).item()
    assert out.shape == q.shape and out.dtype == dtype
    print(f"{kernel} {shape.key} {dtype}: relative error {error:.2e}")
    assert error <= 0.05, f"relative error {error:.3e}"
    assert torch.equal(k, key_before)


def test_sage_1x_really_is_wrong_where_supports_refuses() -> None:
    """Keeps the 1.x key-length refusal honest: if a release fixes it, this fails and the rule can go."""
    version = support.installed_version()
    if version is None or version.major >= 2:
        pytest.skip("only sageattention 1.x mishandles a partial last key block")
    model = ModelInfo("gpu-check", Family.SDXL, DenoiserKind.UNET, "cuda", torch.float16)
    q, k, v = (torch.randn(2, 10, n, 64, device="cuda", dtype=torch.float16) for n in (4096, 77, 77))
    out = support.build(model)(q, k, v)
    reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    assert ((out.float() - reference).norm() / reference.norm()).item() > 0.05
