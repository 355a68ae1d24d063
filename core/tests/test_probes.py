"""The shared probe constraints: the same words for the same refusal in every plugin."""

from __future__ import annotations

import importlib.metadata

import pytest
import torch

from diffstack import probes
from diffstack.types import AttentionShape, Availability, DenoiserKind, Family, ModelInfo


def model_on(device: str) -> ModelInfo:
    return ModelInfo("m", Family.SD1, DenoiserKind.UNET, device, torch.float16)


def test_needs_cuda_on_a_cpu() -> None:
    assert probes.needs_cuda(model_on("cpu")) == Availability.no("needs a CUDA GPU, found cpu")
    assert probes.needs_cuda(model_on("cpu"), (8, 0)).reason == (
        "needs a CUDA GPU with compute capability ≥ 8.0, found cpu"
    )


@pytest.mark.parametrize(
    ("capability", "ok"), [((7, 5), False), ((8, 0), True), ((9, 0), True), ((10, 0), False)]
)
def test_needs_cuda_checks_the_capability_range(
    monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int], ok: bool
) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    answer = probes.needs_cuda(model_on("cuda"), (8, 0), (9, 0))
    assert answer.ok is ok
    if not ok:
        found = f"{capability[0]}.{capability[1]}"
        assert answer.reason == (
            f"needs a CUDA GPU with compute capability 8.0-9.0, found compute capability {found}"
        )


def test_needs_distribution_reads_metadata() -> None:
    pytest_version = importlib.metadata.version("pytest")
    assert probes.needs_distribution("pytest") == Availability.yes(f"pytest {pytest_version}")
    assert probes.needs_distribution("pytest", minimum="9999").reason == (
        f"needs pytest ≥ 9999, found {pytest_version} (pip install pytest)"
    )
    assert probes.needs_distribution("no-such-distribution-here", install="build it").reason == (
        "no-such-distribution-here is not installed (build it)"
    )


def test_needs_module_finds_without_importing() -> None:
    assert probes.needs_module("json", "stdlib").ok
    assert probes.needs_module("no_such_module_here", "pip install it") == Availability.no(
        "no_such_module_here is not installed (pip install it)"
    )


def test_head_dim_in() -> None:
    assert probes.head_dim_in(AttentionShape(8, 64, 16, 16), (64, 128), "K").ok
    assert probes.head_dim_in(AttentionShape(8, 40, 16, 16), (128, 64), "K").reason == (
        "K supports head dims 64, 128; 40 stays with the next offer"
    )


def test_all_of_stops_at_the_first_refusal() -> None:
    asked: list[str] = []

    def answer(name: str, ok: bool) -> Availability:
        asked.append(name)
        return Availability(ok, name)

    assert probes.all_of(
        lambda: answer("a", True), lambda: answer("b", False), lambda: answer("c", True)
    ) == (Availability.no("b"))
    assert asked == ["a", "b"]
    assert probes.all_of(lambda: answer("a", True), lambda: Availability.yes()) == Availability.yes("a")
