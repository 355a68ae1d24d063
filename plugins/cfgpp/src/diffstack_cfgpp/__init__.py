"""CFG++ samplers: guided data prediction, unconditional re-noising (Chung et al., 2024).

The updates work on both halves of a classifier-free-guidance step, so they take the unconditional
and the conditional noise predictions separately; see README.md for why and for what is not wired
into the host yet.
"""

from __future__ import annotations

from diffstack_cfgpp.updates import (
    SAMPLERS,
    DPMpp2MState,
    GuidedDenoiser,
    dpmpp_2m_cfgpp_step,
    euler_cfgpp_step,
    guided_noise,
    sample,
)

__all__ = [
    "SAMPLERS",
    "DPMpp2MState",
    "GuidedDenoiser",
    "dpmpp_2m_cfgpp_step",
    "euler_cfgpp_step",
    "guided_noise",
    "sample",
]
