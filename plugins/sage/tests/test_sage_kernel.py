"""The kernel wrapper against the fake ``sageattention`` modules of conftest.py (CPU).

The fakes compute exact attention on whatever they are handed, so the wrapper's padding, slicing and
scale are right exactly when its output equals SDPA on the unpadded inputs.
"""

from __future__ import annotations

import pytest
import torch
from packaging.version import Version

from diffstack.types import DenoiserKind, Family, ModelInfo
from diffstack_sage import support
from diffstack_sage.config import KERNELS
from diffstack_sage.kernel import sage_attention

HEAD_DIMS = (40, 64, 80, 96, 128)


def qkv(head_dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(head_dim)
    return tuple(torch.randn(2, 3, 70, head_dim, generator=generator).to(dtype) for _ in range(3))  # type: ignore[return-value]


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_v1_pads_to_64_96_128_keeps_the_scale_and_leaves_inputs_alone(
    head_dim: int, fake_sage, exact
) -> None:
    calls = fake_sage("1.0.6")
    attention = sage_attention(Version("1.0.6"))
    q, k, v = qkv(head_dim, torch.float16)
    key_before = k.clone()

    out = attention(q, k, v)

    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out, exact(q, k, v, head_dim**-0.5).half(), atol=2e-3, rtol=2e-3)
    assert torch.equal(k, key_before)  # 1.0.6 subtracts K's mean in place; the wrapper must not let it
    [call] = calls
    assert call["head_dim"] == {40: 64, 80: 96}.get(head_dim, head_dim)
    assert call["sm_scale"] == pytest.approx(head_dim**-0.5)
    assert call["smooth_k"] is False


@pytest.mark.parametrize("kernel", sorted(KERNELS))
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_v2_calls_the_chosen_kernel_padded_to_64_or_128_and_runs_float32_in_half(
    head_dim: int, kernel: str, fake_sage, exact
) -> None:
    calls = fake_sage("2.2.0")
    attention = sage_attention(Version("2.2.0"), kernel)
    q, k, v = qkv(head_dim, torch.float32)

    out = attention(q, k, v)

    assert out.shape == q.shape and out.dtype == torch.float32
    reference = exact(q.half(), k.half(), v.half(), head_dim**-0.5)
    torch.testing.assert_close(out.double(), reference, atol=2e-3, rtol=2e-3)
    [call] = calls
    assert call["function"] == KERNELS[kernel].function
    assert call["head_dim"] == (64 if head_dim <= 64 else 128)
    assert call["sm_scale"] == pytest.approx(head_dim**-0.5)
    assert call.get("smooth_k", True) is True  # 2.x smooths K out of place: its default stays on


def test_v1_has_only_sageattn(fake_sage) -> None:
    fake_sage("1.0.6")
    with pytest.raises(ValueError, match=r"has only sageattn; kernel 'fp8_sm90' needs 2\.x"):
        sage_attention(Version("1.0.6"), "fp8_sm90")


def test_build_through_the_offer_uses_the_installed_generation_and_the_option(
    fake_sage, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = ModelInfo(
        "m", Family.SD1, DenoiserKind.UNET, "cuda", torch.float16, options={"sage": {"kernel": "fp16_triton"}}
    )
    calls = fake_sage("2.2.0")
    monkeypatch.setattr(support, "installed_version", lambda: Version("2.2.0"))
    support.build(model)(*qkv(80, torch.float16))
    assert calls[0]["function"] == "sageattn_qk_int8_pv_fp16_triton"

    calls = fake_sage("1.0.6")
    monkeypatch.setattr(support, "installed_version", lambda: Version("1.0.6"))
    plain = ModelInfo("m", Family.SD1, DenoiserKind.UNET, "cuda", torch.float16)
    support.build(plain)(*qkv(80, torch.float16))
    assert calls[0]["head_dim"] == 96


def test_a_head_dim_over_128_is_refused_loudly(fake_sage) -> None:
    fake_sage("1.0.6")
    attention = sage_attention(Version("1.0.6"))
    with pytest.raises(ValueError, match="up to 128, got 160"):
        attention(*qkv(160, torch.float16))
