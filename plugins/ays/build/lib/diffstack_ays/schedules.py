"""NVIDIA's published Align Your Steps tables and their interpolation to any step count.

Source: NVIDIA's "Align Your Steps" how-to (research.nvidia.com/labs/toronto-ai/AlignYourSteps),
reproduced in FACTS.md. The interpolation is NVIDIA's ``loglinear_interp`` helper, kept verbatim in
behaviour so that our schedules match every other AYS implementation bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from diffstack import Family

TABLES: dict[Family, tuple[float, ...]] = {
    # NVIDIA's SD1.5 table, used for every SD1.x model.
    Family.SD1: (
        14.6146412293, 6.4745760956, 3.8636745985, 2.6946151520, 1.8841921177, 1.3943805092,
        0.9642583904, 0.6523686016, 0.3977456272, 0.1515232662, 0.0291671582,
    ),
    Family.SDXL: (
        14.6146412293, 6.3184485287, 3.7681790315, 2.1811480769, 1.3405244945, 0.8620721141,
        0.5550693289, 0.3798540708, 0.2332364134, 0.1114188177, 0.0291671582,
    ),
}  # fmt: skip
"""The published 10-step schedules: 11 descending sigmas, the last one not yet 0."""


def loglinear_interp(sigmas: Sequence[float], num: int) -> np.ndarray:
    """Resample descending ``sigmas`` to ``num`` points, linearly in log-sigma (NVIDIA's helper).

    Both the table and the result sit on a uniform grid over [0, 1]; the interpolation runs on the
    reversed (ascending) values because ``np.interp`` needs ascending x, then reverses back.
    """
    xs = np.linspace(0, 1, len(sigmas))
    ys = np.log(np.asarray(sigmas, dtype=np.float64)[::-1])
    new_ys = np.interp(np.linspace(0, 1, num), xs, ys)
    return np.exp(new_ys)[::-1].copy()


def ays_sigmas(family: Family, steps: int) -> list[float]:
    """``steps + 1`` descending sigmas ending in 0, for a pipeline's ``sigmas=`` argument.

    At 10 steps this is the published table with its last value replaced by 0, as NVIDIA does; any
    other count interpolates the full table (its last value included) and then sets the last to 0.
    """
    if family not in TABLES:
        raise ValueError(f"no Align Your Steps table for {family}; NVIDIA published SD1.5 and SDXL only")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    table = TABLES[family]
    sigmas = list(table) if steps + 1 == len(table) else loglinear_interp(table, steps + 1).tolist()
    sigmas[-1] = 0.0
    return sigmas
