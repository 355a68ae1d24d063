"""No host sync per denoising step, and classifier-free guidance in one batched denoiser call.

On a GPU every ``.item()``, ``bool(tensor)``, ``.tolist()``, ``.cpu()`` of a device tensor stalls
the CPU until the GPU catches up, so the next step's kernels cannot be queued ahead. CUDA's sync
debug mode needs a GPU; here a torch function mode sees every tensor operation of a generation on
the CPU and counts those calls, for a short and a longer generation: whatever the count, it must
not grow with the step count. Tensors the code put on the CPU on purpose (``.to("cpu")``: diffusers'
scheduler keeps its sigmas there "to avoid too much CPU/GPU communication") and everything computed
from them alone are host tensors on a GPU too, so reading them never waits: those calls are free.
"""

from __future__ import annotations

import collections
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from diffstack.engine import Engine, GenerationJob, GenerationRequest, GenerationResult
from diffstack.testing import baseline_settings, tiny_model
from diffstack.types import Family

SYNCING = frozenset(
    {"item", "__bool__", "__float__", "__int__", "__index__", "tolist", "cpu", "numpy", "nonzero"}
)
"""Tensor methods that make the host wait for a device tensor's value."""


class CountedSyncs(TorchFunctionMode):
    """Counts syncing calls on device tensors by method and caller; tracks which tensors are host ones."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()
        self._host: dict[int, torch.Tensor] = {}  # id -> tensor: kept alive, so ids are not reused

    def host(self, tensor: torch.Tensor) -> bool:
        return self._host.get(id(tensor)) is tensor

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if name in SYNCING and tensors and not self.host(tensors[0]):
            caller = traceback.extract_stack(limit=2)[0]
            self.counts[f"{name} at {Path(caller.filename).name}:{caller.lineno}"] += 1
        output = func(*args, **kwargs)
        to_cpu = name == "to" and any(str(a) == "cpu" for a in (*args[1:], kwargs.get("device")))
        if to_cpu or (tensors and all(self.host(t) for t in tensors)):
            for tensor in tree_leaves(output):
                if isinstance(tensor, torch.Tensor):
                    self._host[id(tensor)] = tensor
        return output


@pytest.fixture(scope="module", params=[Family.SD1, Family.SDXL, Family.FLUX], ids=lambda f: f.value)
def engine(request: pytest.FixtureRequest) -> Engine:
    path = tiny_model(request.param)
    settings = baseline_settings(path.parent, default_model=path.name, engine={"warmup_steps": 0})
    return Engine.start(settings)


def generate(engine: Engine, steps: int) -> None:
    request = engine.prepare(
        GenerationRequest(prompt="a red cube", seeds=(1,), steps=steps, width=64, height=64)
    )
    (result,) = engine.run([GenerationJob(request)])
    assert isinstance(result, GenerationResult)


def syncs(engine: Engine, steps: int) -> collections.Counter[str]:
    with CountedSyncs() as mode:
        generate(engine, steps)
    return mode.counts


@pytest.mark.slow
def test_no_host_sync_per_step(engine: Engine) -> None:
    generate(engine, 2)  # first calls of anything lazy happen outside the comparison
    short, long = syncs(engine, 2), syncs(engine, 6)
    assert long == short, f"syncs that grow with the steps: {long - short}"


@pytest.mark.slow
def test_classifier_free_guidance_is_one_denoiser_call_per_step(engine: Engine) -> None:
    model = engine.model()
    calls: list[int] = []
    denoiser = model.denoiser_for(with_wrappers=False)
    handle = denoiser.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        generate(engine, 2)
        two = len(calls)
        generate(engine, 6)
    finally:
        handle.remove()
    assert len(calls) - two == 6 and two == 2  # guidance 7.5 / 5.0 (both halves batched), FLUX embedded
