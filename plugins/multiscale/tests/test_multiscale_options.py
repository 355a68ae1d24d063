"""Presets, strict options, and the refusal of latents too small to downscale."""

from __future__ import annotations

import pytest

from diffstack import OptionsError, parse_options
from diffstack_multiscale.config import PRESETS, MultiScaleOptions


def test_an_unset_option_takes_the_presets_value_and_a_set_one_wins() -> None:
    speed = parse_options(MultiScaleOptions, {"preset": "speed"})
    assert [speed.setting(k) for k in PRESETS["speed"]] == [float(v) for v in PRESETS["speed"].values()]
    mixed = parse_options(MultiScaleOptions, {"preset": "speed", "intermittent": 3})
    assert mixed.setting("intermittent") == 3
    assert mixed.setting("full_res_below") == PRESETS["speed"]["full_res_below"]


@pytest.mark.parametrize(
    ("options", "option"),
    [
        ({"preset": "fastest"}, "preset"),
        ({"factor": 0.9}, "factor"),
        ({"factor": 0.0}, "factor"),
        ({"full_res_below": 1.5}, "full_res_below"),
        ({"intermittent": -1}, "intermittent"),
        ({"scale": 0.5}, "scale"),
    ],
)
def test_bad_options_are_named(options: dict[str, object], option: str) -> None:
    with pytest.raises(OptionsError) as caught:
        parse_options(MultiScaleOptions, options)
    assert [p.option for p in caught.value.problems] == [option]


def test_a_latent_too_small_to_downscale_is_refused_naming_the_option_that_set_the_factor() -> None:
    preset = parse_options(MultiScaleOptions, {})
    assert preset.latent_problem(8, 8) is None  # 8 → 4 latent pixels a side: served
    problem = preset.latent_problem(8, 6)
    assert problem is not None and problem.option == "preset"
    assert "a 6x8 latent scaled by 0.5 has a side of 3, below the 4 latent pixels" in problem.message
    explicit = parse_options(MultiScaleOptions, {"factor": 0.25})
    problem = explicit.latent_problem(8, 8)
    assert problem is not None and problem.option == "factor"
