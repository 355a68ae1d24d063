"""Sampler names → diffusers schedulers, and plugin samplers run inside the pipeline's own loop.

The built-in samplers reuse diffusers' schedulers; only the naming is ours. A plugin's sampler
(``select_sampler``) needs both halves of the guidance call, which a diffusers pipeline combines
before its scheduler sees them. So the engine keeps the halves of each batched denoiser call
(:class:`GuidanceHalves`, a forward hook) and runs the plugin's step from them inside
:class:`PluginSamplerScheduler`, an Euler scheduler (its sigmas, timesteps, model-input scaling,
custom ``sigmas=``, img2img start) whose update is the plugin's. The pipeline's own combination of
the halves is computed and left unused.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import diffusers
import torch
from diffusers import EulerDiscreteScheduler, SchedulerMixin
from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteSchedulerOutput

from diffstack.types import SamplerOffer, SamplerStep


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


PLUGIN_SAMPLER_BASE = SAMPLERS["euler"]
"""What a plugin sampler's scheduler takes from the built-ins: Euler's sigmas (and custom ``sigmas=``)."""
PIPELINE_GUIDANCE = 2.0
"""The guidance scale the pipeline is given under a plugin sampler: any value above 1 makes diffusers
run the two-half call; the request's own scale goes to the plugin's step."""


class GuidanceHalves:
    """The unconditional and conditional halves of the denoiser's last call, kept by a forward hook
    (the pipeline stacks ``[uncond, cond]`` in one batch and splits its output the same way)."""

    def __init__(self) -> None:
        self.uncond: torch.Tensor | None = None
        self.cond: torch.Tensor | None = None

    def __call__(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        prediction = output[0] if isinstance(output, tuple) else output.sample
        self.uncond, self.cond = prediction.chunk(2)

    @contextlib.contextmanager
    def kept_from(self, denoiser: torch.nn.Module) -> Iterator[None]:
        handle = denoiser.register_forward_hook(self)
        try:
            yield
        finally:
            handle.remove()

    def take(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.uncond is None or self.cond is None:
            raise RuntimeError("the denoiser's guidance halves were not seen before the sampler's step")
        halves = self.uncond, self.cond
        self.uncond = self.cond = None
        return halves


class PluginSamplerScheduler(EulerDiscreteScheduler):
    """Euler's schedule with a plugin's update: each ``step`` ignores the pipeline's combined
    prediction and calls the plugin's step with the kept halves and the request's guidance."""

    def run_plugin(self, offer: SamplerOffer, guidance: float, halves: GuidanceHalves) -> None:
        """Bind one trajectory of ``offer`` (call once per pipeline call)."""
        self._plugin_step: SamplerStep = offer.start()
        self._guidance = guidance
        self._halves = halves

    def step(
        self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, *args: Any, **kwargs: Any
    ) -> EulerDiscreteSchedulerOutput | tuple[torch.Tensor]:
        euler: Any = self  # diffusers' scheduler state is set at run time, unseen by type checkers
        if euler.step_index is None:
            euler._init_step_index(timestep)
        index = euler.step_index
        sigma, sigma_next = (float(s) for s in euler.sigmas[index : index + 2])
        x = sample.to(torch.float32)
        uncond, cond = (self._noise(h.to(torch.float32), x, sigma) for h in self._halves.take())
        prev = self._plugin_step(x, sigma, sigma_next, uncond, cond, self._guidance).to(model_output.dtype)
        euler._step_index += 1
        if not kwargs.get("return_dict", True):
            return (prev,)
        return EulerDiscreteSchedulerOutput(prev_sample=prev, pred_original_sample=None)

    def _noise(self, output: torch.Tensor, x: torch.Tensor, sigma: float) -> torch.Tensor:
        """The model's output as ε, whatever it predicts (as Euler derives its own derivative)."""
        euler: Any = self
        kind = euler.config.prediction_type
        if kind == "epsilon":
            return output
        if kind == "v_prediction":
            data = output * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)
        elif kind in ("sample", "original_sample"):
            data = output
        else:
            raise ValueError(f"prediction_type {kind!r} is not one a plugin sampler can read")
        return (x - data) / sigma


def plugin_scheduler(base_config: Any) -> PluginSamplerScheduler:
    """A fresh plugin-sampler scheduler from the model's own scheduler config."""
    return PluginSamplerScheduler.from_config(base_config, **PLUGIN_SAMPLER_BASE.config)
