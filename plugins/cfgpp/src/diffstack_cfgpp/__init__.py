"""CFG++ samplers: guided data prediction, unconditional re-noising (Chung et al., 2024).

Offered through ``select_sampler`` as ``euler_cfgpp`` and ``dpmpp_2m_cfgpp``: a request names one
as its sampler, with a guidance scale in [0, 1]. The updates (:mod:`diffstack_cfgpp.updates`) take
the unconditional and the conditional noise predictions apart, which is why they are samplers of
their own and not a denoiser wrapper; the host hands them both halves of each guidance call.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

from diffstack import GuidanceRule, ModelInfo, SamplerOffer, hookimpl

if TYPE_CHECKING:
    from diffstack import SamplerStep

DEFAULT_GUIDANCE = 0.6
"""The scale a request that sets none gets: the middle of the 0.4-0.8 the paper and our quality
figures favour (CFG++ at λ guides about as strongly as ordinary CFG at a scale above 1)."""

DESCRIPTIONS = {
    "euler_cfgpp": "Euler CFG++: denoise with the guided noise, re-noise with the unconditional one",
    "dpmpp_2m_cfgpp": "DPM++ 2M CFG++: the second-order multistep update with CFG++'s re-noising",
}


def _starter(name: str) -> SamplerStep:
    from diffstack_cfgpp.updates import trajectory  # torch only once a request runs it

    return trajectory(name)


@hookimpl
def select_sampler(model: ModelInfo) -> list[SamplerOffer]:
    return [
        SamplerOffer(
            name=name,
            priority=0,
            description=description,
            guidance=GuidanceRule.CFG_PP,
            default_guidance=DEFAULT_GUIDANCE,
            start=partial(_starter, name),
        )
        for name, description in DESCRIPTIONS.items()
    ]
