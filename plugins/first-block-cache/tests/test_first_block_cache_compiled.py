"""First-block cache on a compiled tiny FLUX transformer: eager's numbers and hits, no recompiles."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from diffusers import FluxTransformer2DModel
from diffusers.hooks.first_block_cache import FBCHeadBlockHook
from torch._dynamo.utils import counters

from diffstack import DenoiserWrapper
from diffstack_first_block_cache import _apply
from diffstack_first_block_cache.compiled import COMPILE_LIKE, TWIN, regional_twin

SEQ, TEXT = 16, 5
THRESHOLD = 0.3
"""On these inputs the first block's residual moves by 0.17 to 0.35 per step: some hits, some misses."""


def compile_like(target: Any) -> Any:
    """The compile offer's stand-in: a real ``torch.compile``, with the eager backend to stay fast."""
    return torch.compile(target, backend="eager", fullgraph=True)


@pytest.fixture
def compiled(tiny_transformer: Callable[[], FluxTransformer2DModel]) -> torch.nn.Module:
    module = compile_like(tiny_transformer())
    object.__setattr__(module, COMPILE_LIKE, compile_like)
    return module


@torch.no_grad()
def denoise(transformer: torch.nn.Module, steps: int, batch: int = 1) -> list[torch.Tensor]:
    """FluxPipeline's calls with true CFG: "cond" then "uncond" per step, latents drifting slowly."""
    g = torch.Generator().manual_seed(0)
    text, pooled = torch.randn(batch, TEXT, 32, generator=g), torch.randn(batch, 32, generator=g)
    latents = torch.randn(batch, SEQ, 16, generator=g)
    outputs = []
    for step in range(steps):
        latents = latents + 0.02 * torch.randn(batch, SEQ, 16, generator=g)
        for context, shift in (("cond", 0.0), ("uncond", 0.5)):
            with transformer.cache_context(context):
                outputs.append(
                    transformer(
                        hidden_states=latents,
                        encoder_hidden_states=text + shift,
                        pooled_projections=pooled,
                        timestep=torch.tensor([1.0 - step / (4 * steps)] * batch),
                        img_ids=torch.zeros(SEQ, 3),
                        txt_ids=torch.zeros(TEXT, 3),
                        return_dict=False,
                    )[0]
                )
    return outputs


def _original(transformer: torch.nn.Module) -> Any:
    return getattr(transformer, "_orig_mod", transformer)


@contextmanager
def attached(transformer: torch.nn.Module, threshold: float) -> Iterator[DenoiserWrapper]:
    handle = _apply(transformer, {"threshold": threshold})
    handle.reset_state()
    try:
        yield handle
    finally:
        handle.remove()


@pytest.fixture
def decisions(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Every decision of diffusers' head hook: True = run the remaining blocks."""
    made: list[bool] = []
    decide = FBCHeadBlockHook._should_compute_remaining_blocks

    def spy(self: FBCHeadBlockHook, residual: torch.Tensor) -> bool:
        made.append(decide(self, residual))
        return made[-1]

    monkeypatch.setattr(FBCHeadBlockHook, "_should_compute_remaining_blocks", spy)
    return made


def counted(calls: list[str], name: str, forward: Callable[..., Any]) -> Callable[..., Any]:
    def run(*args: Any, **kwargs: Any) -> Any:
        calls.append(name)
        return forward(*args, **kwargs)

    return run


def test_threshold_zero_is_exactly_the_eager_cache(compiled: torch.nn.Module) -> None:
    with attached(_original(compiled), 0.0):
        eager = denoise(_original(compiled), 5)
    with attached(compiled, 0.0):
        outputs = denoise(compiled, 5)
    assert all(torch.equal(a, b) for a, b in zip(outputs, eager, strict=True))


def test_same_hits_and_numbers_as_eager(compiled: torch.nn.Module, decisions: list[bool]) -> None:
    with attached(_original(compiled), THRESHOLD):
        eager = denoise(_original(compiled), 6)
    eager_decisions = decisions.copy()
    decisions.clear()
    with attached(compiled, THRESHOLD):
        outputs = denoise(compiled, 6)
    assert decisions == eager_decisions
    assert True in decisions[1:] and False in decisions  # both a miss and a hit after the first step
    assert all(torch.equal(a, b) for a, b in zip(outputs, eager, strict=True))


def test_a_hit_runs_only_the_first_compiled_block(compiled: torch.nn.Module) -> None:
    twin = regional_twin(compiled)
    calls: list[str] = []
    for index, block in enumerate(twin.transformer_blocks):
        block.forward = counted(calls, f"double.{index}", block.forward)
    with attached(compiled, 1e6):
        denoise(compiled, 3)
    # Each context's first call runs every block (its own cache), then only the first block runs.
    assert calls == ["double.0", "double.1"] * 2 + ["double.0"] * 4


def test_requests_reuse_the_compiled_blocks(compiled: torch.nn.Module) -> None:
    with attached(compiled, 0.05):
        first = denoise(compiled, 3)
    graphs = counters["stats"]["unique_graphs"]
    with attached(compiled, 0.05):
        second = denoise(compiled, 3)
    assert counters["stats"]["unique_graphs"] == graphs
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    with attached(compiled, 0.05):  # a new batch size: a new request, its own cache
        assert [tuple(out.shape) for out in denoise(compiled, 3, batch=2)] == [(2, SEQ, 16)] * 6
    assert vars(compiled)[TWIN] is regional_twin(compiled)


def test_remove_restores_the_compiled_forward(compiled: torch.nn.Module) -> None:
    forward = compiled.forward
    with attached(compiled, 0.05), pytest.raises(RuntimeError, match="already attached"):
        _apply(compiled, {})
    assert compiled.forward == forward
