"""compile_model: build each offer, check it against eager, time it, keep the fastest.

Two exclusive slots share the hook: ``compile_model`` (offers targeting the denoiser) and
``compile_vae`` (offers targeting the VAE decode). Each slot checks its offers against its own eager
output and times them on its own inputs; a lossy offer (fp8 GEMMs) passes only within
``compose.lossy_tolerance``, and its drift is in the report either way.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from diffstack.compose.slots import (
    ModelUnderTest,
    SlotRecorder,
    Trial,
    agreed_across_ranks,
    build_guard,
    settle,
    valid_offers,
)
from diffstack.config import ComposeSettings
from diffstack.plugins import Failure, PluginHost, guard
from diffstack.timing import median_ms, relative_error
from diffstack.types import CandidateStatus, CompileOffer, CompileTarget, SlotReport

CompileTrial = Trial[CompileOffer, torch.nn.Module]


@dataclass(frozen=True)
class CompileDecision:
    """The module that replaces the denoiser (or VAE decode), or None to run it eagerly."""

    compiled: torch.nn.Module | None
    report: SlotReport


def compose_compile(
    host: PluginHost, model: ModelUnderTest, settings: ComposeSettings, reference: torch.Tensor
) -> CompileDecision:
    """``reference`` is the eager denoiser's output with the chosen attention in place."""

    def run(module: torch.nn.Module) -> torch.Tensor:
        return model.denoise(module)

    def timed(module: torch.nn.Module) -> Callable[[], Any]:
        return lambda: module(**model.denoiser_inputs, return_dict=False)

    slot = SlotRecorder("compile_model")
    return _decide(host, model, settings, slot, CompileTarget.DENOISER, model.denoiser, reference, run, timed)


def compose_vae_compile(
    host: PluginHost, model: ModelUnderTest, settings: ComposeSettings
) -> CompileDecision:
    """The VAE decode's slot: offers built on the VAE, checked against its eager decode of one
    image's latents at the default size."""
    slot = SlotRecorder("compile_vae")
    vae, latents = model.vae, model.vae_latents
    if vae is None or latents is None:
        return CompileDecision(None, slot.report([]))

    def run(module: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():  # as the pipeline decodes: no second compile (see ModelUnderTest.denoise)
            output: torch.Tensor = module(latents)
            return output

    def timed(module: torch.nn.Module) -> Callable[[], Any]:
        return lambda: module(latents)

    with torch.inference_mode():
        reference = vae.decode(latents, return_dict=False)[0]  # type: ignore[operator]
    return _decide(host, model, settings, slot, CompileTarget.VAE_DECODE, vae, reference, run, timed)


def _decide(
    host: PluginHost,
    model: ModelUnderTest,
    settings: ComposeSettings,
    slot: SlotRecorder,
    target: CompileTarget,
    component: torch.nn.Module,
    reference: torch.Tensor,
    run: Callable[[torch.nn.Module], torch.Tensor],
    timed: Callable[[torch.nn.Module], Callable[[], Any]],
) -> CompileDecision:
    bf16 = model.info.dtype == torch.bfloat16
    exact = settings.compile_tolerance_bf16 if bf16 else settings.compile_tolerance
    passing: list[CompileTrial] = []
    offers = valid_offers(
        host, "compile_model", CompileOffer, model, settings, slot, where=lambda o: o.target is target
    )
    for trial in offers:
        started = time.perf_counter()
        module = build_guard(settings, "build", trial.offer.build, component, model.info)
        # Ranks of a parallel group keep or drop an offer together, before and after its first
        # call (a collective on every rank): see agreed_across_ranks.
        build_failed = agreed_across_ranks({"failed": float(isinstance(module, Failure))})["failed"]
        if isinstance(module, Failure):
            slot.fail(replace(trial, setup_s=time.perf_counter() - started), module)
            continue
        if build_failed:
            slot.record(
                trial, CandidateStatus.FAILED, "its build failed on another rank of the parallel group"
            )
            continue
        trial = trial.with_build(module)
        # The first call compiles and may record CUDA graphs, which replay only on the thread that
        # recorded them: it runs here, on the engine's thread, outside the build's time limit.
        output = guard("run", run, trial.value())
        trial = replace(trial, setup_s=time.perf_counter() - started)
        error = None if isinstance(output, Failure) else relative_error(output, reference)
        agreed = agreed_across_ranks({"failed": float(isinstance(output, Failure)), "error": error})
        if isinstance(output, Failure):
            slot.fail(trial, output)
            continue
        if agreed["failed"]:
            slot.record(trial, CandidateStatus.FAILED, "it failed on another rank of the parallel group")
            continue
        trial = replace(trial, numeric_error=agreed["error"])
        tolerance = settings.lossy_tolerance if trial.offer.lossy else exact
        if trial.numeric_error is not None and trial.numeric_error > tolerance:
            reason = f"relative error {trial.numeric_error:.2e} vs eager exceeds {tolerance:.0e}"
            slot.record(trial, CandidateStatus.REJECTED, reason)
            continue
        if trial.offer.lossy:
            trial = replace(trial, notes=(*trial.notes, f"lossy: drift {trial.numeric_error:.2e} accepted"))
        if model.measure:
            trial = replace(
                trial, time_ms=median_ms(timed(trial.value()), settings.repeats, model.info.device)
            )
        passing.append(trial)
    winner = settle(slot, passing, measured=model.measure, tie_fraction=settings.tie_fraction)
    return CompileDecision(
        winner.value() if winner else None, slot.report([winner.offer.name] if winner else [])
    )
