"""The schedules themselves: the published tables and NVIDIA's interpolation, pinned."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from diffstack.types import Family
from diffstack_ays.schedules import TABLES, ays_sigmas

SD15_10 = [
    14.6146412293, 6.4745760956, 3.8636745985, 2.6946151520, 1.8841921177, 1.3943805092,
    0.9642583904, 0.6523686016, 0.3977456272, 0.1515232662, 0.0,
]  # fmt: skip
SDXL_10 = [
    14.6146412293, 6.3184485287, 3.7681790315, 2.1811480769, 1.3405244945, 0.8620721141,
    0.5550693289, 0.3798540708, 0.2332364134, 0.1114188177, 0.0,
]  # fmt: skip


def nvidia_loglinear_interp(t_steps: list[float], num_steps: int) -> np.ndarray:
    """NVIDIA's helper from the Align Your Steps how-to, copied verbatim as the oracle."""
    xs = np.linspace(0, 1, len(t_steps))
    ys = np.log(t_steps[::-1])
    new_xs = np.linspace(0, 1, num_steps)
    new_ys = np.interp(new_xs, xs, ys)
    interped_ys = np.exp(new_ys)[::-1].copy()
    return interped_ys


@pytest.mark.parametrize(("family", "expected"), [(Family.SD1, SD15_10), (Family.SDXL, SDXL_10)])
def test_ten_steps_is_the_published_table_ending_in_zero(family: Family, expected: list[float]) -> None:
    assert ays_sigmas(family, 10) == expected
    assert TABLES[family][-1] == 0.0291671582  # the published last value, replaced by 0 above


@pytest.mark.parametrize("family", [Family.SD1, Family.SDXL])
@pytest.mark.parametrize("steps", [1, 4, 7, 15, 20, 25, 50])
def test_other_step_counts_match_nvidias_helper(family: Family, steps: int) -> None:
    expected = nvidia_loglinear_interp(list(TABLES[family]), steps + 1)
    expected[-1] = 0.0
    sigmas = ays_sigmas(family, steps)
    assert len(sigmas) == steps + 1
    assert sigmas == expected.tolist()
    assert all(a > b for a, b in itertools.pairwise(sigmas))


def test_twenty_steps_interleaves_table_and_geometric_means() -> None:
    # 21 points on the same [0, 1] grid as the 11 published ones: every other point is a table
    # value, and the points between are geometric means of their neighbours (log-linear).
    table = TABLES[Family.SD1]
    sigmas = ays_sigmas(Family.SD1, 20)
    for i, value in enumerate(table[:-1]):
        assert sigmas[2 * i] == pytest.approx(value, rel=1e-12)
    for i in range(10):
        assert sigmas[2 * i + 1] == pytest.approx(math.sqrt(table[i] * table[i + 1]), rel=1e-12)
    assert sigmas[-1] == 0.0


def test_pinned_values() -> None:
    assert ays_sigmas(Family.SD1, 5) == pytest.approx(
        [14.6146412293, 3.8636745985, 1.8841921177, 0.9642583904, 0.3977456272, 0.0], rel=1e-12
    )
    assert ays_sigmas(Family.SDXL, 4) == pytest.approx(
        [14.6146412293, 2.8668722413060417, 0.8620721141, 0.2976504679801153, 0.0], rel=1e-12
    )


def test_rejects_families_without_a_table_and_empty_schedules() -> None:
    with pytest.raises(ValueError, match=r"SD1\.5 and SDXL only"):
        ays_sigmas(Family.SD2, 10)
    with pytest.raises(ValueError, match="at least 1"):
        ays_sigmas(Family.SD1, 0)
