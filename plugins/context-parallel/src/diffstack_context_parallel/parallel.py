"""A transformer denoiser split across the ranks of a process group, through diffusers' own
context parallelism (``enable_parallelism`` with a ``ContextParallelConfig`` and the model's
``_cp_plan``).

diffusers applies parallelism in place and cannot undo it (``enable_parallelism`` refuses a second
call), while the host builds every ``compile_model`` offer from the same denoiser and keeps eager
execution as its reference and fallback. So the parallel denoiser is a *twin*: new module objects
(hooks, attention processors) over the very same parameter and buffer tensors, which costs no weight
memory and leaves the original one-GPU model untouched.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist

from diffstack import Built

CP_BACKEND_CUDA = "_native_cudnn"
"""PyTorch's cuDNN attention: supports context parallelism and returns the log-sum-exp ring needs;
the FACTS.md measurements on two H200s used it."""


def parallel_denoiser(denoiser: torch.nn.Module, mode: str, *, compile_it: bool) -> Built[torch.nn.Module]:
    """A twin of ``denoiser`` whose every call is split over the default process group (``mode``:
    ``ulysses`` or ``ring``); optionally compiled. Every rank must build it, and call it, in lockstep."""
    from diffusers import ContextParallelConfig

    if getattr(denoiser, "_cp_plan", None) is None:
        raise TypeError(f"{type(denoiser).__name__} has no context-parallel plan (_cp_plan) in diffusers")
    world = dist.get_world_size()
    twin = weight_sharing_twin(denoiser)
    notes = [f"{mode} degree {world}", _use_parallel_backend(twin, mode)]
    config = (
        ContextParallelConfig(ulysses_degree=world)
        if mode == "ulysses"
        else ContextParallelConfig(ring_degree=world)
    )
    with _accelerator_count_for_cpu():
        twin.enable_parallelism(config=config)  # type: ignore[operator]
    if compile_it:
        dtype = next(twin.parameters()).dtype
        twin = torch.compile(twin)  # type: ignore[assignment]
        twin.register_forward_pre_hook(_one_call_form(dtype), with_kwargs=True)
        notes.append("torch.compile (default mode)")
    return Built(twin, tuple(notes))


def _one_call_form(dtype: torch.dtype) -> Any:
    """One call form for the host's check and the pipeline, so one compiled graph serves both.

    Dynamo guards on how a module is called, and FLUX's pipeline passes ``guidance`` in float32 and
    ``joint_attention_kwargs=None`` where the host's check passes neither: each form would compile
    anew (about 100 s for FLUX). The transformer casts ``timestep`` and ``guidance`` to its own dtype
    first thing, so casting them here changes no number; a None keyword is the default anyway.
    """

    def normalize(
        module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        named = {key: value for key, value in kwargs.items() if value is not None}
        for key in ("timestep", "guidance"):
            value = named.get(key)
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                named[key] = value.to(dtype).contiguous()
        return args, named

    return normalize


def weight_sharing_twin(module: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of ``module`` whose parameters and buffers are the original tensors themselves."""
    shared: dict[int, Any] = {id(t): t for t in itertools.chain(module.parameters(), module.buffers())}
    return copy.deepcopy(module, shared)


def _current_backend(module: torch.nn.Module) -> str:
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    for sub in module.modules():
        processor = getattr(sub, "processor", None)
        if processor is not None and hasattr(processor, "_attention_backend"):
            chosen = processor._attention_backend
            if chosen is not None:
                return str(getattr(chosen, "value", chosen))
            break
    active = _AttentionBackendRegistry.get_active_backend()[0]
    return str(getattr(active, "value", active))


def _use_parallel_backend(twin: torch.nn.Module, mode: str) -> str:
    """Put an attention backend that can run ``mode`` on the twin (never on the original)."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    current = _current_backend(twin)
    device = next(twin.parameters()).device
    supported = _AttentionBackendRegistry._is_context_parallel_available(AttentionBackendName(current))
    # "native" (plain SDPA) cannot return the log-sum-exp that ring attention merges with.
    if device.type == "cuda" and (not supported or current == "native"):
        twin.set_attention_backend(CP_BACKEND_CUDA)  # type: ignore[operator]
        return f"attention {CP_BACKEND_CUDA} (was {current})"
    return f"attention {current}"


@contextmanager
def _accelerator_count_for_cpu() -> Iterator[None]:
    """diffusers 0.42.1 places each rank on ``rank % torch.accelerator.device_count()``, which divides
    by zero on a machine without an accelerator. On such a machine (a gloo group: tests, smoke runs)
    the count reads 1 for this call only; with an accelerator nothing changes."""
    if torch.accelerator.device_count() > 0:
        yield
        return
    original = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: 1
    try:
        yield
    finally:
        torch.accelerator.device_count = original
