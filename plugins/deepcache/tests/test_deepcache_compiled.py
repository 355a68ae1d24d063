"""DeepCache on a compiled UNet: the same numbers as on the eager one, two graphs, no per-request compiles."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from diffusers import UNet2DConditionModel
from torch._dynamo.utils import counters

from diffstack_deepcache import _apply
from diffstack_deepcache.compiled import COMPILE_LIKE, CompiledDeepCacheHandle

pytestmark = pytest.mark.slow  # torch.compile on a CPU: tens of seconds


def inputs(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A step's UNet inputs (a CFG batch of 2), the timestep as the compile offer hands it on."""
    g = torch.Generator().manual_seed(step)
    timestep = torch.tensor(900.0 - 100 * step)
    return torch.randn(2, 4, 8, 8, generator=g), timestep, torch.randn(2, 7, 32, generator=g)


def denoise(unet: torch.nn.Module, steps: int) -> list[torch.Tensor]:
    return [unet(*inputs(step)).sample for step in range(steps)]


def tiny_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
    ).eval()


def compile_like(module: torch.nn.Module) -> torch.nn.Module:
    """What the torch_compile offer does, with a backend that compiles in milliseconds on a CPU."""
    return torch.compile(module, backend="aot_eager", dynamic=False)  # type: ignore[return-value]


@pytest.fixture(scope="module")
def compiled() -> Iterator[torch.nn.Module]:
    torch._dynamo.reset()
    module = compile_like(tiny_unet())
    object.__setattr__(module, COMPILE_LIKE, compile_like)
    yield module
    torch._dynamo.reset()


@torch.no_grad()
def test_the_eager_cache_s_numbers_from_two_graphs_compiled_once(compiled: torch.nn.Module) -> None:
    eager = tiny_unet()
    expected_handle = _apply(eager, {"interval": 3})
    expected = denoise(eager, 6)
    expected_handle.remove()
    plain = denoise(compiled, 2)

    counters.clear()
    for request in range(3):
        handle = _apply(compiled, {"interval": 3})
        assert isinstance(handle, CompiledDeepCacheHandle)
        handle.reset_state()
        outputs = denoise(compiled, 6)
        handle.remove()
        for got, want in zip(outputs, expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"request {request}")
    assert not torch.allclose(outputs[1], plain[1])  # step 1 really was cached
    assert counters["stats"]["unique_graphs"] == 2  # the full and the cached step, for every request
    assert all(torch.equal(a, b) for a, b in zip(denoise(compiled, 2), plain, strict=True))  # forward is back
    assert counters["stats"]["unique_graphs"] == 2  # and the plain graph did not recompile


@torch.no_grad()
def test_a_new_request_and_a_new_batch_size_start_with_a_full_step(compiled: torch.nn.Module) -> None:
    sample, timestep, text = inputs(5)
    handle = _apply(compiled, {"interval": 10})
    denoise(compiled, 3)
    handle.reset_state()
    first = compiled(sample, timestep, text).sample
    single = compiled(sample[:1], timestep, text[:1]).sample
    handle.remove()
    torch.testing.assert_close(first, compiled(sample, timestep, text).sample)
    torch.testing.assert_close(single, compiled(sample[:1], timestep, text[:1]).sample)


def test_one_deepcache_per_compiled_unet_and_the_branch_is_checked(compiled: torch.nn.Module) -> None:
    handle = _apply(compiled, {})
    with pytest.raises(RuntimeError, match="already attached"):
        _apply(compiled, {})
    handle.remove()
    with pytest.raises(ValueError, match=r"branch must be in \[0, 3\]"):
        _apply(compiled, {"branch": 4})
    _apply(compiled, {"branch": 3}).remove()


def test_the_copy_shares_the_weights(compiled: torch.nn.Module) -> None:
    handle = _apply(compiled, {"branch": 1})
    runner = handle._runner
    handle.remove()
    ours = {id(p) for p in runner.module.parameters()}
    assert ours == {id(p) for p in compiled.parameters()}
