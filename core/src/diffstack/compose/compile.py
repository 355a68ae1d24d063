"""compile_model: build each offer, check it against eager, time it, keep the fastest."""

from __future__ import annotations

import time
from functools import partial

import torch

from diffstack.compose.slots import (
    ComposedStack,
    ModelUnderTest,
    SlotRecorder,
    guard,
    pick_fastest,
    valid_offers,
)
from diffstack.config import ComposeSettings
from diffstack.plugins import OfferFrom, PluginHost
from diffstack.timing import median_ms, relative_error
from diffstack.types import (
    CandidateStatus,
    CompileOffer,
)


def compose_compile(
    host: PluginHost, model: ModelUnderTest, settings: ComposeSettings, stack: ComposedStack
) -> None:
    slot = SlotRecorder("compile_model")
    passing: list[tuple[OfferFrom, torch.nn.Module, float, float, float | None]] = []
    for source, offer in valid_offers(host, "compile_model", CompileOffer, model, slot):
        started = time.perf_counter()
        result = guard("build", _build_and_run, offer, model)
        setup_s = time.perf_counter() - started
        if isinstance(result, str):
            slot.add(source, CandidateStatus.FAILED, result, setup_s=setup_s)
            continue
        module, output = result
        error = relative_error(output, model.reference_output)
        bf16 = model.info.dtype == torch.bfloat16
        tolerance = settings.compile_tolerance_bf16 if bf16 else settings.compile_tolerance
        if error > tolerance:
            slot.add(
                source,
                CandidateStatus.REJECTED,
                f"relative error {error:.2e} vs eager exceeds {tolerance:.0e}",
                numeric_error=error,
                setup_s=setup_s,
            )
            continue
        elapsed = (
            median_ms(
                partial(module, **model.denoiser_inputs, return_dict=False),
                settings.repeats,
                model.info.device,
            )
            if model.measure
            else None
        )
        passing.append((source, module, error, setup_s, elapsed))
    if passing:
        winner, reasons = pick_fastest([(p[0], p[4]) for p in passing], settings.tie_fraction)
        for index, (source, module, error, setup_s, elapsed) in enumerate(passing):
            won = source is winner
            status = (
                CandidateStatus.CHOSEN
                if won
                else (CandidateStatus.SLOWER if model.measure else CandidateStatus.AVAILABLE)
            )
            slot.add(
                source,
                status,
                "" if won else reasons[index],
                numeric_error=error,
                time_ms=elapsed,
                setup_s=setup_s,
            )
            if won:
                stack.compiled = module
                slot.chosen.append(source.offer.name)
    stack.slots.append(slot.report())


def _build_and_run(offer: CompileOffer, model: ModelUnderTest) -> tuple[torch.nn.Module, torch.Tensor]:
    module = offer.build(model.denoiser, model.info)
    with torch.inference_mode():
        output = module(**model.denoiser_inputs, return_dict=False)[0]
    return module, output
