"""DeepCache on a real tiny UNet: what is skipped, when, and that switching it off changes nothing."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from diffusers import UNet2DConditionModel

from diffstack.options import OptionsError, parse_options
from diffstack_deepcache.hooks import HOOK_NAME, DeepCacheConfig, apply_deep_cache, deep_modules

pytestmark = pytest.mark.slow

# The tiny UNet's skip connections: 0 conv_in, 1 down_blocks.0 resnet, 2 its downsampler,
# 3 down_blocks.1 resnet. Up blocks consume them last first: up_blocks.0 takes 3 then 2,
# up_blocks.1 takes 1 then 0.
DEEP = {
    0: ["down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1.resnets.0",
        "up_blocks.1.attentions.0"],
    1: ["down_blocks.0.downsamplers", "down_blocks.1", "mid_block", "up_blocks.0"],
    2: ["down_blocks.1", "mid_block", "up_blocks.0.resnets.0"],
    3: ["mid_block"],
}  # fmt: skip

# Leaves that compute only when their deep ancestor runs, and leaves of the shallow path.
PROBES = ["conv_in", "down_blocks.1.resnets.0", "mid_block.resnets.0", "up_blocks.0.resnets.0", "conv_out"]


@pytest.fixture(scope="module")
def unet() -> UNet2DConditionModel:
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


def inputs(step: int) -> tuple[torch.Tensor, int, torch.Tensor]:
    """A step's UNet inputs: a new latent and timestep per step, one prompt for all (CFG batch of 2)."""
    g = torch.Generator().manual_seed(step)
    return (
        torch.randn(2, 4, 8, 8, generator=g),
        900 - 100 * step,
        torch.randn(2, 7, 32, generator=g.manual_seed(99)),
    )


@torch.no_grad()
def denoise(unet: UNet2DConditionModel, steps: int) -> list[torch.Tensor]:
    return [unet(*inputs(step)).sample for step in range(steps)]


@contextmanager
def counting(unet: torch.nn.Module) -> Iterator[Counter[str]]:
    """Counts the real forward calls of PROBES (a skipped module's children never run)."""
    calls: Counter[str] = Counter()
    modules = dict(unet.named_modules())
    handles = [
        modules[name].register_forward_hook(lambda *_, name=name: calls.update([name])) for name in PROBES
    ]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("branch", sorted(DEEP))
def test_deep_modules_follow_the_skip_connections(unet: UNet2DConditionModel, branch: int) -> None:
    assert [name for name, _ in deep_modules(unet, branch)] == DEEP[branch]


@pytest.mark.parametrize("branch", sorted(DEEP))
@torch.no_grad()
def test_a_cached_step_on_unchanged_inputs_reproduces_the_full_step(
    unet: UNet2DConditionModel, branch: int
) -> None:
    # The deep features are the ones the full step would compute, so the output must be identical:
    # this proves the fresh shallow feature and the cached deep one meet at the right layer.
    reference = unet(*inputs(0)).sample
    handle = apply_deep_cache(unet, DeepCacheConfig(interval=4, branch=branch))
    try:
        outputs = [unet(*inputs(0)).sample for _ in range(4)]
    finally:
        handle.remove()
    assert all(torch.equal(output, reference) for output in outputs)


@torch.no_grad()
def test_cached_steps_skip_the_deep_blocks(unet: UNet2DConditionModel) -> None:
    reference = denoise(unet, 6)
    handle = apply_deep_cache(unet, DeepCacheConfig(interval=3, branch=0))
    try:
        with counting(unet) as calls:
            outputs = denoise(unet, 6)
    finally:
        handle.remove()
    # Full steps 0 and 3; steps 1, 2, 4, 5 run conv_in and the last up layer only.
    assert calls == {
        "conv_in": 6, "conv_out": 6,
        "down_blocks.1.resnets.0": 2, "mid_block.resnets.0": 2, "up_blocks.0.resnets.0": 2,
    }  # fmt: skip
    assert torch.equal(outputs[0], reference[0]) and torch.equal(outputs[3], reference[3])
    assert not torch.equal(outputs[1], reference[1])
    assert all(torch.isfinite(output).all() for output in outputs)


@torch.no_grad()
def test_deeper_branches_recompute_more(unet: UNet2DConditionModel) -> None:
    handle = apply_deep_cache(unet, DeepCacheConfig(interval=2, branch=3))
    try:
        with counting(unet) as calls:
            denoise(unet, 4)
    finally:
        handle.remove()
    assert calls["down_blocks.1.resnets.0"] == 4  # above branch 3: always computed
    assert calls["up_blocks.0.resnets.0"] == 4  # consumes skip connection 3: always computed
    assert calls["mid_block.resnets.0"] == 2  # below it: full steps only


@torch.no_grad()
def test_interval_one_is_exactly_no_cache(unet: UNet2DConditionModel) -> None:
    reference = denoise(unet, 4)
    handle = apply_deep_cache(unet, DeepCacheConfig(interval=1))
    try:
        outputs = denoise(unet, 4)
    finally:
        handle.remove()
    assert all(torch.equal(a, b) for a, b in zip(outputs, reference, strict=True))


@torch.no_grad()
def test_remove_restores_the_unet_exactly(unet: UNet2DConditionModel) -> None:
    reference = denoise(unet, 3)
    handle = apply_deep_cache(unet, DeepCacheConfig(interval=5))
    denoise(unet, 3)
    handle.remove()
    assert all(torch.equal(a, b) for a, b in zip(denoise(unet, 3), reference, strict=True))
    for name, module in unet.named_modules():
        registry = getattr(module, "_diffusers_hook", None)
        assert registry is None or registry.get_hook(HOOK_NAME) is None, name
    apply_deep_cache(unet, DeepCacheConfig()).remove()  # and it can be attached again


@torch.no_grad()
def test_reset_state_starts_the_next_generation_with_a_full_step(unet: UNet2DConditionModel) -> None:
    reference = denoise(unet, 1)[0]
    handle = apply_deep_cache(unet, DeepCacheConfig(interval=10))
    try:
        denoise(unet, 2)
        handle.reset_state()
        with counting(unet) as calls:
            first = denoise(unet, 1)[0]
    finally:
        handle.remove()
    assert calls["mid_block.resnets.0"] == 1
    assert torch.equal(first, reference)


@pytest.mark.parametrize(
    "config",
    [
        DeepCacheConfig(interval=2, start=2, end=6),
        DeepCacheConfig(interval=2, start=0.25, end=0.75, num_inference_steps=8),
    ],
)
@torch.no_grad()
def test_full_steps_outside_the_window(unet: UNet2DConditionModel, config: DeepCacheConfig) -> None:
    handle = apply_deep_cache(unet, config)
    try:
        with counting(unet) as calls:
            denoise(unet, 8)
    finally:
        handle.remove()
    # Steps 0, 1 before the window, 2 and 4 inside it, 6 and 7 after it; 3 and 5 are cached.
    assert calls["mid_block.resnets.0"] == 6


@torch.no_grad()
def test_a_new_input_shape_forces_a_full_step(unet: UNet2DConditionModel) -> None:
    sample, timestep, text = inputs(0)
    handle = apply_deep_cache(unet, DeepCacheConfig(interval=10))
    try:
        unet(sample, timestep, text)
        with counting(unet) as calls:
            unet(sample[:1], timestep, text[:1])
    finally:
        handle.remove()
    assert calls["mid_block.resnets.0"] == 1


def test_one_deepcache_per_unet(unet: UNet2DConditionModel) -> None:
    handle = apply_deep_cache(unet, DeepCacheConfig())
    try:
        with pytest.raises(RuntimeError, match="already attached"):
            apply_deep_cache(unet, DeepCacheConfig())
    finally:
        handle.remove()


@pytest.mark.parametrize(
    ("options", "option", "message"),
    [
        ({"interval": 0}, "interval", "greater than or equal to 1, got 0"),
        ({"interval": 2.5}, "interval", "valid integer, got 2.5"),
        ({"interval": "3"}, "interval", "valid integer, got '3'"),
        ({"interval": True}, "interval", "valid integer, got True"),
        ({"branch": -1}, "branch", "greater than or equal to 0, got -1"),
        ({"start": float("nan")}, "start", "finite number"),
        ({"start": 0.1}, "start", "no num_inference_steps"),
        ({"end": 2.5}, "end", "neither a fraction below 1 nor a step index"),
        ({"intervall": 3}, "intervall", "unknown option; known: interval, branch, start, end"),
    ],
)
def test_bad_options_name_the_option_and_say_what_is_wrong(
    options: dict[str, object], option: str, message: str
) -> None:
    with pytest.raises(OptionsError) as failure:
        parse_options(DeepCacheConfig, options)
    ((problem),) = failure.value.problems
    assert problem.option == option
    assert message in problem.message


def test_a_branch_beyond_the_unet_is_refused(unet: UNet2DConditionModel) -> None:
    with pytest.raises(ValueError, match=r"branch must be in \[0, 3\] for this UNet, got 4"):
        apply_deep_cache(unet, DeepCacheConfig(branch=4))
