"""The wrap_denoiser check: a wrapper must leave the denoiser as it was once removed, judged against
the output just before it was applied, with room for run-to-run noise but none for a leftover hook."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from diffstack import DenoiserWrapperOffer, hookimpl
from diffstack.testing import compose_with
from diffstack.types import CandidateStatus


class _Handle:
    def __init__(self, denoiser: torch.nn.Module, scale: float, leak: bool) -> None:
        def scaled(_module: torch.nn.Module, _args: Any, out: Any) -> Any:
            return (out[0] * scale, *out[1:])

        self._hook = denoiser.register_forward_hook(scaled)
        self._leak = leak

    def reset_state(self) -> None:
        pass

    def remove(self) -> None:
        if not self._leak:
            self._hook.remove()


class WrapperPlugin:
    """One wrapper offer that scales the denoiser's output; ``leak`` forgets to take its hook off."""

    def __init__(self, leak: bool) -> None:
        self.__name__ = "diffstack_leaky" if leak else "diffstack_tidy"
        self._leak = leak

    @hookimpl
    def wrap_denoiser(self, model: Any) -> list[DenoiserWrapperOffer]:
        name = self.__name__.removeprefix("diffstack_")
        return [
            DenoiserWrapperOffer(
                name=name, apply=lambda denoiser, options: _Handle(denoiser, 1.5, self._leak)
            )
        ]


@pytest.mark.parametrize(
    ("leak", "status"), [(False, CandidateStatus.AVAILABLE), (True, CandidateStatus.REJECTED)]
)
def test_wrap_denoiser_check_refuses_only_a_wrapper_left_behind(leak: bool, status: CandidateStatus) -> None:
    report = compose_with(WrapperPlugin(leak))
    (candidate,) = [c for c in report.slot("wrap_denoiser").candidates if c.offer in ("leaky", "tidy")]
    assert candidate.status is status, candidate.reason
    if leak:
        assert "did not restore the denoiser" in candidate.reason
        assert "moved by" in candidate.reason
