"""DeepCache's options, declared for :func:`diffstack.options.parse_options` (no torch imported)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated

from diffstack import Ge, OptionProblem, OptionsError


@dataclass(frozen=True)
class DeepCacheConfig:
    """DeepCache's options, as an admin or a request writes them (``deepcache`` section).

    ``start`` and ``end`` bound the window of steps that may be cached (full steps outside it). A
    value below 1 is a fraction of the generation's steps and needs ``num_inference_steps``; 1 and
    above is a step index (``end`` exclusive; ``None`` runs the window to the last step).
    """

    interval: Annotated[int, Ge(1)] = 3
    """Every ``interval``-th step runs the whole UNet; the ones between reuse its deep features."""
    branch: Annotated[int, Ge(0)] = 0
    """The skip connection below which features are cached (0 caches the most)."""
    start: Annotated[float, Ge(0)] = 0
    end: Annotated[float, Ge(0)] | None = None
    num_inference_steps: Annotated[int, Ge(1)] | None = None

    def __post_init__(self) -> None:
        self.window()

    def window(self) -> tuple[int, int | None]:
        """The window as step indices: cached steps happen at ``start <= step < end``."""
        return self._step("start", self.start), None if self.end is None else self._step("end", self.end)

    def _step(self, name: str, value: float) -> int:
        if value >= 1:
            if int(value) != value:
                raise _bad(name, f"{value} is neither a fraction below 1 nor a step index")
            return int(value)
        if value <= 0:
            return 0
        if self.num_inference_steps is None:
            raise _bad(
                name,
                f"{value} is a fraction of the steps, but the options carry no num_inference_steps: "
                "give a step index instead",
            )
        return math.floor(value * self.num_inference_steps + 0.5)


def _bad(option: str, message: str) -> OptionsError:
    return OptionsError([OptionProblem(option, message)])
