"""Align Your Steps (NVIDIA): the published noise schedules for SD1.5 and SDXL, offered as ``ays``.

The hook only describes the offer; the tables and the interpolation live in
:mod:`diffstack_ays.schedules`, imported when a schedule is first built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from diffstack import Availability, Family, ModelInfo, SigmasOffer, hookimpl

if TYPE_CHECKING:
    from diffusers import SchedulerMixin

PUBLISHED_FAMILIES = frozenset({Family.SD1, Family.SDXL})
"""Families with a table from NVIDIA (SD1.5 for SD1, SDXL for SDXL). SD2 and FLUX have none."""

PRIORITY = 50
"""Above the scheduler's own schedules (``default`` 0, ``karras`` 10), so ``auto`` picks AYS
wherever NVIDIA published a table."""


def _probe(model: ModelInfo) -> Availability:
    if model.family in PUBLISHED_FAMILIES:
        return Availability.yes()
    return Availability.no(
        f"NVIDIA published Align Your Steps schedules for SD1.5 and SDXL only; this model is {model.family}"
    )


@hookimpl
def build_sigmas(model: ModelInfo) -> list[SigmasOffer]:
    family = model.family

    def build(steps: int, scheduler: SchedulerMixin) -> list[float]:
        # The tables are absolute sigmas of the SD noise schedule: the scheduler has no say.
        from diffstack_ays.schedules import ays_sigmas

        return ays_sigmas(family, steps)

    return [
        SigmasOffer(
            name="ays",
            priority=PRIORITY,
            description="Align Your Steps: NVIDIA's published schedule, interpolated to the step count",
            probe=_probe,
            families=PUBLISHED_FAMILIES,
            build=build,
        )
    ]
