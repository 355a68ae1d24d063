"""compile_model: build each offer, check it against eager, time it, keep the fastest."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from functools import partial

import torch

from diffstack.compose.slots import ModelUnderTest, SlotRecorder, Trial, build_guard, settle, valid_offers
from diffstack.config import ComposeSettings
from diffstack.plugins import Failure, PluginHost, guard
from diffstack.timing import median_ms, relative_error
from diffstack.types import CandidateStatus, CompileOffer, SlotReport

CompileTrial = Trial[CompileOffer, torch.nn.Module]


@dataclass(frozen=True)
class CompileDecision:
    """The module that replaces the denoiser, or None to run it eagerly."""

    compiled: torch.nn.Module | None
    report: SlotReport


def compose_compile(
    host: PluginHost, model: ModelUnderTest, settings: ComposeSettings, reference: torch.Tensor
) -> CompileDecision:
    """``reference`` is the eager denoiser's output with the chosen attention in place."""
    slot = SlotRecorder("compile_model")
    bf16 = model.info.dtype == torch.bfloat16
    tolerance = settings.compile_tolerance_bf16 if bf16 else settings.compile_tolerance
    passing: list[CompileTrial] = []
    for trial in valid_offers(host, "compile_model", CompileOffer, model, settings, slot):
        started = time.perf_counter()
        module = build_guard(settings, "build", trial.offer.build, model.denoiser, model.info)
        if isinstance(module, Failure):
            slot.fail(replace(trial, setup_s=time.perf_counter() - started), module)
            continue
        trial = trial.with_build(module)
        # The first call compiles and may record CUDA graphs, which replay only on the thread that
        # recorded them: it runs here, on the engine's thread, outside the build's time limit.
        output = guard("run", model.denoise, trial.value())
        trial = replace(trial, setup_s=time.perf_counter() - started)
        if isinstance(output, Failure):
            slot.fail(trial, output)
            continue
        trial = replace(trial, numeric_error=relative_error(output, reference))
        if trial.numeric_error is not None and trial.numeric_error > tolerance:
            reason = f"relative error {trial.numeric_error:.2e} vs eager exceeds {tolerance:.0e}"
            slot.record(trial, CandidateStatus.REJECTED, reason)
            continue
        if model.measure:
            call = partial(trial.value(), **model.denoiser_inputs, return_dict=False)
            trial = replace(trial, time_ms=median_ms(call, settings.repeats, model.info.device))
        passing.append(trial)
    winner = settle(slot, passing, measured=model.measure, tie_fraction=settings.tie_fraction)
    return CompileDecision(
        winner.value() if winner else None, slot.report([winner.offer.name] if winner else [])
    )
