"""Sampler names → diffusers schedulers. Reuses diffusers' schedulers; only the naming is ours."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import diffusers
from diffusers import SchedulerMixin


@dataclass(frozen=True)
class Sampler:
    """A named scheduler configuration."""

    name: str
    scheduler_class: str
    config: dict[str, Any] = field(default_factory=dict)
    flow_matching: bool = False
    custom_sigmas: bool = False
    """Whether custom schedules reach it through ``sigmas=`` (checked against diffusers' code)."""

    def build(self, base_config: Any) -> SchedulerMixin:
        """A fresh scheduler from the model's own scheduler config (schedulers carry per-run state)."""
        scheduler_type = getattr(diffusers, self.scheduler_class)
        return scheduler_type.from_config(base_config, **self.config)


SAMPLERS: dict[str, Sampler] = {
    s.name: s
    for s in (
        Sampler("euler", "EulerDiscreteScheduler", custom_sigmas=True),
        Sampler("euler_a", "EulerAncestralDiscreteScheduler"),
        Sampler(
            "dpmpp_2m", "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}
        ),
        Sampler(
            "dpmpp_2m_karras",
            "DPMSolverMultistepScheduler",
            {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
        ),
        Sampler("unipc", "UniPCMultistepScheduler"),
        Sampler("ddim", "DDIMScheduler"),
        Sampler("flow_euler", "FlowMatchEulerDiscreteScheduler", flow_matching=True, custom_sigmas=True),
    )
}
