"""Never OK with garbage, and the answer names what really ran: NaN output, run-time plugin faults."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from diffstack.attention import sdpa
from diffstack.engine import Engine, GenerationJob, GenerationRequest, GenerationResult
from diffstack.errors import ModelError
from diffstack.hookspecs import hookimpl
from diffstack.plugins import load_plugins
from diffstack.testing import baseline_settings
from diffstack.types import (
    AttentionOffer,
    Availability,
    DenoiserWrapperOffer,
    ModelInfo,
    PluginRecord,
    SigmasOffer,
)


class Faults:
    """A plugin whose offers pass composition, then misbehave when the test says so."""

    def __init__(self) -> None:
        self.attention = "ok"  # "ok", "nan" or "raise"
        self.schedule_raises = False
        self.wrapper_raises = False

    def _kernel(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        if self.attention == "raise":
            raise RuntimeError("flaky kernel: unsupported at this shape")
        out = sdpa(query, key, value)
        return out * float("nan") if self.attention == "nan" else out

    def _sigmas(self, steps: int, scheduler: Any) -> list[float] | None:
        if self.schedule_raises:
            raise ValueError("flaky schedule")
        return None

    @hookimpl
    def select_attention(self, model: ModelInfo) -> list[AttentionOffer]:
        return [
            AttentionOffer(
                name="flaky", priority=100, probe=lambda _m: Availability.yes(), build=lambda _m: self._kernel
            )
        ]

    @hookimpl
    def build_sigmas(self, model: ModelInfo) -> list[SigmasOffer]:
        return [SigmasOffer(name="flaky_sigmas", build=self._sigmas)]

    @hookimpl
    def wrap_denoiser(self, model: ModelInfo) -> list[DenoiserWrapperOffer]:
        def apply(_denoiser: torch.nn.Module, _options: Any) -> Any:
            if self.wrapper_raises:
                raise RuntimeError("flaky wrapper cannot attach")
            return _Detached()

        return [DenoiserWrapperOffer(name="flaky_wrapper", apply=apply)]


@pytest.fixture(scope="module")
def faults() -> Faults:
    return Faults()


@pytest.fixture(scope="module")
def faulty_engine(models_dir: Path, faults: Faults) -> Engine:
    settings = baseline_settings(models_dir)
    host = load_plugins(settings.plugins)
    host.register(faults, PluginRecord("faults", "", "", "", (), "loaded"))
    return Engine.start(settings, host)


@pytest.fixture(autouse=True)
def healthy(faults: Faults) -> Iterator[None]:
    yield
    faults.attention, faults.schedule_raises, faults.wrapper_raises = "ok", False, False


def run(engine: Engine, **fields: Any) -> GenerationResult | Exception:
    request = engine.prepare(
        GenerationRequest(**{"prompt": "a red circle", "steps": 2, "seeds": (3,), **fields})
    )
    (outcome,) = engine.run([GenerationJob(request)])
    return outcome


def test_the_flaky_kernel_is_composed_and_named_while_it_works(faulty_engine: Engine) -> None:
    result = run(faulty_engine)
    assert isinstance(result, GenerationResult)
    assert all(entry.endswith(": flaky") for entry in result.stack["select_attention"])
    assert "fallback" not in result.stack


def test_nan_after_composition_is_retried_on_the_reference_stack(
    faulty_engine: Engine, faults: Faults, engine: Engine
) -> None:
    faults.attention = "nan"
    result = run(faulty_engine, schedule="default")
    assert isinstance(result, GenerationResult), result
    picture = np.asarray(result.images[0].image)
    assert picture.std() > 0, "a black (or flat) picture is garbage, not an answer"
    assert result.stack["select_attention"] == ("sdpa",)
    assert result.stack["fallback"] == ("reference stack: the composed stack gave a non-finite image",)
    reference = run(engine, schedule="default")
    assert isinstance(reference, GenerationResult)
    assert np.array_equal(picture, np.asarray(reference.images[0].image)), "the reference stack's own picture"


def test_nan_on_the_reference_stack_too_fails_with_a_model_error(
    faulty_engine: Engine, faults: Faults
) -> None:
    faults.attention = "nan"
    model = faulty_engine.model()
    with _poisoned(model.pipeline.vae.decoder):
        outcome = run(faulty_engine)
    assert isinstance(outcome, ModelError)
    assert "non-finite" in str(outcome)


def test_a_kernel_failing_at_run_time_is_reported_as_sdpa(faulty_engine: Engine, faults: Faults) -> None:
    faults.attention = "raise"
    result = run(faulty_engine)
    assert isinstance(result, GenerationResult)
    entries = result.stack["select_attention"]
    assert entries and all(e.endswith(": sdpa (flaky failed at run time)") for e in entries), entries
    assert "fallback" not in result.stack


def test_a_schedule_failing_at_run_time_is_reported_as_the_schedulers_own(
    faulty_engine: Engine, faults: Faults
) -> None:
    faults.schedule_raises = True
    result = run(faulty_engine, schedule="flaky_sigmas")
    assert isinstance(result, GenerationResult)
    assert result.stack["build_sigmas"] == ("default",)


def test_a_wrapper_failing_to_attach_is_left_out_of_the_answer(faulty_engine: Engine, faults: Faults) -> None:
    attached = run(faulty_engine, wrappers={"flaky_wrapper": {}})
    assert isinstance(attached, GenerationResult)
    assert attached.stack["wrap_denoiser"] == ("flaky_wrapper",)
    faults.wrapper_raises = True
    result = run(faulty_engine, wrappers={"flaky_wrapper": {}})
    assert isinstance(result, GenerationResult)
    assert result.stack["wrap_denoiser"] == ()


class _Detached:
    """A wrapper that changes nothing (composition checks it against the plain denoiser)."""

    def reset_state(self) -> None:
        pass

    def remove(self) -> None:
        pass


@contextlib.contextmanager
def _poisoned(module: torch.nn.Module) -> Iterator[None]:
    handle = module.register_forward_hook(lambda _m, _i, output: output * float("nan"))
    try:
        yield
    finally:
        handle.remove()
