"""The wrapper on a real (tiny) UNet, and the whole path through the engine on the tiny SD1 model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from diffstack import parse_options
from diffstack.engine import Engine, GenerationJob, GenerationRequest, GenerationResult
from diffstack.errors import InvalidRequest
from diffstack.testing import BASELINE_PLUGINS, baseline_settings, build_tiny_pipeline
from diffstack.types import Family
from diffstack_multiscale.config import MultiScaleOptions
from diffstack_multiscale.wrapper import _NOISE_STD, MultiScale


@pytest.fixture(scope="module")
def unet() -> torch.nn.Module:
    return build_tiny_pipeline(Family.SD1).unet.eval()


def _call(unet: torch.nn.Module, timestep: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(timestep)
    sample = torch.randn(2, 4, 16, 16, generator=generator)
    context = torch.randn(2, 7, 32, generator=generator)
    with torch.inference_mode():
        return unet(sample, timestep, encoder_hidden_states=context, return_dict=False)[0]


def _seen_sizes(unet: torch.nn.Module, timesteps: list[int], options: dict[str, Any]) -> list[int]:
    """The latent side the UNet's first layer saw on each call, with the wrapper attached."""
    seen: list[int] = []
    spy = unet.conv_in.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[-1]))
    wrapper = MultiScale(unet, parse_options(MultiScaleOptions, options))
    try:
        wrapper.reset_state()
        for t in timesteps:
            assert _call(unet, t).shape == (2, 4, 16, 16), "the prediction comes back at full size"
    finally:
        wrapper.remove()
        spy.remove()
    return seen


def test_phases_first_steps_coarse_middle_intermittent_and_late_steps_at_full_size(
    unet: torch.nn.Module,
) -> None:
    timesteps = [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    quality = _seen_sizes(unet, timesteps, {"preset": "quality"})  # start 2, every 2nd coarse, below 500
    assert quality == [16, 16, 8, 16, 8, 16, 16, 16, 16, 16]
    speed = _seen_sizes(unet, timesteps, {"preset": "speed"})  # start 1, no intermittent, below 300
    assert speed == [16, 8, 8, 8, 8, 8, 8, 16, 16, 16]


def test_a_coarse_step_is_the_unet_on_the_downscaled_latent_upscaled_plus_the_unseen_detail_as_noise(
    unet: torch.nn.Module,
) -> None:
    wrapper = MultiScale(unet, parse_options(MultiScaleOptions, {"full_res_start": 0, "full_res_below": 0.0}))
    try:
        wrapped = _call(unet, 999)
    finally:
        wrapper.remove()
    generator = torch.Generator().manual_seed(999)
    sample = torch.randn(2, 4, 16, 16, generator=generator)
    context = torch.randn(2, 7, 32, generator=generator)
    with torch.inference_mode():
        small = torch.nn.functional.interpolate(sample, size=(8, 8), mode="area")
        expected = unet(small, 999, encoder_hidden_states=context, return_dict=False)[0]
        up = torch.nn.functional.interpolate
        detail = (sample - up(small, size=(16, 16), mode="bilinear")) / _NOISE_STD[999]
        expected = up(expected, size=(16, 16), mode="bilinear") + detail.float()
    torch.testing.assert_close(wrapped, expected)


def test_the_noise_share_is_the_sd_training_schedules() -> None:
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    torch.testing.assert_close(_NOISE_STD.float(), (1 - scheduler.alphas_cumprod).sqrt())


def test_removed_it_leaves_the_unet_exactly_as_it_was(unet: torch.nn.Module) -> None:
    before = _call(unet, 999)
    MultiScale(unet, parse_options(MultiScaleOptions, {})).remove()
    assert torch.equal(_call(unet, 999), before)


@pytest.fixture(scope="module")
def engine(models_dir: Path) -> Engine:
    settings = baseline_settings(models_dir, plugins={"allow": [*BASELINE_PLUGINS, "multiscale"]})
    return Engine.start(settings)


def test_a_request_runs_with_it_end_to_end(engine: Engine) -> None:
    request = engine.prepare(
        GenerationRequest(
            prompt="a red circle", steps=4, seeds=(1,), wrappers={"multiscale": {"preset": "speed"}}
        )
    )
    (outcome,) = engine.run([GenerationJob(request)])
    assert isinstance(outcome, GenerationResult), outcome
    assert outcome.stack["wrap_denoiser"] == ("multiscale",)
    assert outcome.images[0].image.size == (64, 64)


def test_a_size_whose_downscaled_latent_is_too_small_is_refused_before_any_work(engine: Engine) -> None:
    with pytest.raises(InvalidRequest) as caught:
        engine.prepare(
            GenerationRequest(prompt="a red circle", width=48, height=64, wrappers={"multiscale": {}})
        )
    (violation,) = caught.value.violations
    assert violation.field == "wrappers.multiscale.preset"
    assert "a 6x8 latent scaled by 0.5 has a side of 3" in violation.description
