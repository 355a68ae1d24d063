"""The baseline schedules: the scheduler's own, and Karras sigmas over the trained range."""

from __future__ import annotations

import itertools
import math

import pluggy
import torch
from diffusers import EulerDiscreteScheduler

import diffstack_schedules
from diffstack import hookspecs
from diffstack.testing import assert_offer_passes, compose_with
from diffstack.types import DenoiserKind, Family, ModelInfo


def offers(family: Family = Family.SD1):  # type: ignore[no-untyped-def]
    manager = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    manager.add_hookspecs(hookspecs)
    manager.register(diffstack_schedules)
    model = ModelInfo("m", family, DenoiserKind.UNET, "cpu", torch.float32)
    return {o.name: o for result in manager.hook.build_sigmas(model=model) for o in result}


def sd_scheduler() -> EulerDiscreteScheduler:
    return EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def test_default_defers_to_the_scheduler_and_outranks_karras() -> None:
    found = offers()
    assert found["default"].build(20, sd_scheduler()) is None
    assert found["default"].priority > found["karras"].priority


def test_karras_spans_the_trained_range_and_ends_in_zero() -> None:
    sigmas = offers()["karras"].build(10, sd_scheduler())
    assert len(sigmas) == 11 and sigmas[-1] == 0.0
    assert math.isclose(sigmas[0], 14.6146, rel_tol=1e-4)
    assert math.isclose(sigmas[-2], 0.0292, rel_tol=1e-2)
    assert all(a > b for a, b in itertools.pairwise(sigmas))


def test_karras_is_not_offered_for_flow_matching() -> None:
    assert Family.FLUX not in offers()["karras"].families


def test_the_host_accepts_both_schedules_and_refuses_karras_for_flux() -> None:
    assert assert_offer_passes(diffstack_schedules, offer="default")
    assert assert_offer_passes(diffstack_schedules, offer="karras")
    report = compose_with(diffstack_schedules, family=Family.FLUX)
    (karras,) = [c for c in report.slot("build_sigmas").candidates if c.offer == "karras"]
    assert karras.reason == "not made for flux models"


def test_flow_arcsine_is_for_flow_models_only_and_crowds_both_ends() -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    offer = offers(Family.FLUX)["flow_arcsine"]
    assert offer.families == frozenset({Family.FLUX})
    sigmas = offer.build(8, FlowMatchEulerDiscreteScheduler(shift=3.0))
    assert len(sigmas) == 9 and sigmas[0] == 1.0 and sigmas[-1] == 0.0
    assert all(a > b for a, b in itertools.pairwise(sigmas))
    gaps = [a - b for a, b in itertools.pairwise(sigmas[:-1])]
    assert gaps[0] < gaps[3] > gaps[-1]  # small steps at both ends, large in the middle
    assert sigmas[-2] < 1 / 8  # the last jump to 0 is shorter than the default's (from 1/steps)


def test_flow_arcsine_runs_through_the_scheduler_shift() -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sigmas = offers(Family.FLUX)["flow_arcsine"].build(12, scheduler)
    scheduler.set_timesteps(sigmas=sigmas[:-1])  # as the engine passes them to a flow sampler
    shifted = scheduler.sigmas.tolist()
    assert len(shifted) == 13 and shifted[-1] == 0.0
    assert math.isclose(shifted[1], 3 * sigmas[1] / (1 + 2 * sigmas[1]), rel_tol=1e-5)


def test_the_host_accepts_flow_arcsine_for_flux_and_refuses_it_for_unets() -> None:
    assert assert_offer_passes(diffstack_schedules, offer="flow_arcsine", family=Family.FLUX)
    report = compose_with(diffstack_schedules, family=Family.SD1)
    (arcsine,) = [c for c in report.slot("build_sigmas").candidates if c.offer == "flow_arcsine"]
    assert arcsine.reason == "not made for sd1 models"
