"""The hook, called through pluggy exactly as the host calls it."""

from __future__ import annotations

import pluggy
import pytest
import torch
from diffusers import EulerDiscreteScheduler

import diffstack.hookspecs
import diffstack_ays
from diffstack.types import DenoiserKind, Family, ModelInfo, SigmasOffer


def model_info(family: Family) -> ModelInfo:
    kind = DenoiserKind.TRANSFORMER if family is Family.FLUX else DenoiserKind.UNET
    return ModelInfo(name="tiny", family=family, denoiser_kind=kind, device="cpu", dtype=torch.float32)


def offers(family: Family) -> list[SigmasOffer]:
    pm = pluggy.PluginManager("diffstack")
    pm.add_hookspecs(diffstack.hookspecs)
    pm.register(diffstack_ays)
    return [offer for result in pm.hook.build_sigmas(model=model_info(family)) for offer in result]


@pytest.mark.parametrize("family", [Family.SD1, Family.SDXL])
def test_offers_ays_above_the_schedulers_own(family: Family) -> None:
    (offer,) = offers(family)
    assert offer.name == "ays"
    assert offer.priority > 10  # the baseline schedules: the scheduler's own (10) and karras (0)
    assert offer.families == {Family.SD1, Family.SDXL}
    assert offer.probe(model_info(family)).ok


@pytest.mark.parametrize("family", [Family.SD2, Family.FLUX])
def test_probe_says_why_not(family: Family) -> None:
    (offer,) = offers(family)
    answer = offer.probe(model_info(family))
    assert not answer.ok
    assert answer.reason == (
        f"NVIDIA published Align Your Steps schedules for SD1.5 and SDXL only; this model is {family}"
    )


def test_build_feeds_an_euler_scheduler() -> None:
    # The SD scheduler that the engine passes sigmas= to: AYS must land in it unchanged.
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    sigma_max = float(scheduler.sigmas.max())
    (offer,) = offers(Family.SDXL)
    sigmas = offer.build(12, scheduler)
    assert sigmas is not None
    assert sigmas[0] == pytest.approx(sigma_max, rel=1e-6)  # the tables start at SD's own sigma_max
    scheduler.set_timesteps(sigmas=sigmas)
    assert torch.allclose(scheduler.sigmas, torch.tensor(sigmas, dtype=torch.float32))
    assert len(scheduler.timesteps) == 12


def test_the_host_accepts_the_offer_on_a_tiny_model() -> None:
    """Through the host's own checks, as plugin authors test theirs (diffstack.testing)."""
    from diffstack.testing import assert_offer_passes

    assert assert_offer_passes(diffstack_ays, offer="ays")
