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
