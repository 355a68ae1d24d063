"""Fallback order: a kernel that raises or does not serve a shape hands over to the next accepted one."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from diffstack.attention import ChainLink, KernelChain, sdpa
from diffstack.engine import Engine, GenerationJob, GenerationRequest, GenerationResult
from diffstack.hookspecs import hookimpl
from diffstack.plugins import load_plugins
from diffstack.testing import baseline_settings
from diffstack.types import AttentionOffer, AttentionShape, Availability, ModelInfo, PluginRecord


def _qkv(query_len: int = 16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return tuple(torch.randn(1, 2, n, 8, generator=generator) for n in (query_len, 16, 16))  # type: ignore[return-value]


def _scaled(factor: float):  # a recognisable kernel: SDPA times a factor
    return lambda q, k, v: sdpa(q, k, v) * factor


def _raises(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    raise RuntimeError("no kernel image for this GPU")


def _only_query_len(length: int):
    def supports(shape: AttentionShape) -> Availability:
        return (
            Availability.yes()
            if shape.query_len == length
            else Availability.no(f"query length {length} only")
        )

    return supports


def test_the_first_link_runs_when_it_serves() -> None:
    chain = KernelChain([ChainLink("fast", _scaled(2.0)), ChainLink("next", _scaled(3.0))])
    q, k, v = _qkv()
    assert torch.equal(chain(q, k, v), sdpa(q, k, v) * 2.0)
    assert (chain.used, chain.passed_over) == ("fast", ())
    assert chain.order == "fast → next → sdpa"


def test_a_link_that_raises_hands_over_to_the_next_not_to_sdpa_and_stays_passed_over() -> None:
    calls = []

    def counting(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return _raises(q, k, v)

    chain = KernelChain([ChainLink("sage", counting), ChainLink("sparge", _scaled(3.0))])
    q, k, v = _qkv()
    for _ in range(2):
        assert torch.equal(chain(q, k, v), sdpa(q, k, v) * 3.0)
        assert (chain.used, chain.passed_over) == ("sparge", ("sage failed at run time",))
    assert len(calls) == 1, "a kernel that raised is not called again"


def test_a_shape_a_link_does_not_serve_goes_to_the_next_that_does_then_sdpa() -> None:
    chain = KernelChain(
        [
            ChainLink("sage", _scaled(2.0), _only_query_len(16)),
            ChainLink("sparge", _scaled(3.0), _only_query_len(32)),
        ]
    )
    q, k, v = _qkv(16)
    assert torch.equal(chain(q, k, v), sdpa(q, k, v) * 2.0)
    q, k, v = _qkv(32)
    assert torch.equal(chain(q, k, v), sdpa(q, k, v) * 3.0)
    assert chain.used == "sparge"
    assert chain.passed_over == ("sage does not serve h2xd8 q32 k16: query length 16 only",)
    q, k, v = _qkv(64)
    assert torch.equal(chain(q, k, v), sdpa(q, k, v))
    assert chain.used == "sdpa" and len(chain.passed_over) == 2


def test_a_supports_that_raises_serves_nothing() -> None:
    def broken(shape: AttentionShape) -> Availability:
        raise ValueError("bad predicate")

    chain = KernelChain([ChainLink("odd", _scaled(2.0), broken)])
    q, k, v = _qkv()
    assert torch.equal(chain(q, k, v), sdpa(q, k, v))
    assert chain.passed_over == (
        "odd does not serve h2xd8 q16 k16: its supports() raised ValueError: bad predicate",
    )


class TwoKernels:
    """Two accepted kernels above SDPA: 'first' (priority 100) and 'second' (priority 50)."""

    def __init__(self) -> None:
        self.first_raises = False
        self.first_serves = True  # False: 'first' refuses every shape it is asked about from then on

    def _first(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.first_raises:
            raise RuntimeError("first kernel broke")
        return sdpa(q, k, v)

    def _first_supports(self, shape: AttentionShape) -> Availability:
        return Availability.yes() if self.first_serves else Availability.no("measured sizes only")

    @hookimpl
    def select_attention(self, model: ModelInfo) -> list[AttentionOffer]:
        return [
            AttentionOffer(
                name="first", priority=100, build=lambda _m: self._first, supports=self._first_supports
            ),
            AttentionOffer(name="second", priority=50, build=lambda _m: sdpa),
        ]


@pytest.fixture(scope="module")
def kernels() -> TwoKernels:
    return TwoKernels()


@pytest.fixture(scope="module")
def engine(models_dir: Path, kernels: TwoKernels) -> Engine:
    settings = baseline_settings(models_dir)
    host = load_plugins(settings.plugins)
    host.register(kernels, PluginRecord("kernels", "", "", "", (), "loaded"))
    return Engine.start(settings, host)


@pytest.fixture(autouse=True)
def healthy(kernels: TwoKernels) -> Iterator[None]:
    yield
    kernels.first_raises, kernels.first_serves = False, True


def _generate(engine: Engine, size: int = 64) -> GenerationResult:
    request = engine.prepare(
        GenerationRequest(prompt="a red circle", steps=2, seeds=(3,), width=size, height=size)
    )
    (outcome,) = engine.run([GenerationJob(request)])
    assert isinstance(outcome, GenerationResult), outcome
    return outcome


def test_the_report_shows_each_scopes_fallback_order(engine: Engine) -> None:
    notes = [n for n in engine.model().report.notes if n.startswith("attention fallback order")]
    assert notes and all(n.endswith(": first → second → sdpa") for n in notes), notes


def test_a_shape_the_kernel_does_not_serve_falls_back_to_the_next(
    engine: Engine, kernels: TwoKernels
) -> None:
    kernels.first_serves = False  # asked only about shapes composition did not see: 128² here
    entries = _generate(engine, size=128).stack["select_attention"]
    assert entries and all(": second (first does not serve h" in e for e in entries), entries
    assert all(e.endswith(": first") for e in _generate(engine).stack["select_attention"]), "64² still served"


# Runs last: a kernel that raised stays passed over in this module's engine.
def test_a_kernel_raising_at_run_time_falls_back_to_the_next_accepted_one(
    engine: Engine, kernels: TwoKernels
) -> None:
    assert all(e.endswith(": first") for e in _generate(engine).stack["select_attention"])
    kernels.first_raises = True
    entries = _generate(engine).stack["select_attention"]
    assert entries and all(e.endswith(": second (first failed at run time)") for e in entries), entries
