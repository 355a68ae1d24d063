"""DeepCache on a compiled UNet: the full and the cached step as two compiled graphs.

The compile offer's module (``torch.compile`` of the UNet, CUDA graphs on CUDA) cannot take
DeepCache's hooks per request: attaching them changes the code it was compiled for (a recompile per
request), and a CUDA graph cannot branch on the per-step decision. So the decision stays outside the
graphs. Once per UNet and branch, a copy of the UNet that shares every parameter and buffer carries
DeepCache's skip hooks for good and is compiled with the compile offer's own settings
(``diffstack_compile_like``). Dynamo specialises that copy on the hooks' ``skipping`` flag: one graph
for full steps, which also hands out the deep features, one for cached steps, which reads them.
A request's handle swaps the compiled module's ``forward`` for a dispatcher that counts the steps
and picks the graph, and puts it back on ``remove()``. The features live in the copy's state, reset
per request (the engine runs one request's batch at a time per model); a change of batch or size
forces a full step.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from typing import Any

import torch
from diffusers.hooks import HookRegistry
from torch.utils._pytree import tree_map

from diffstack_deepcache.config import DeepCacheConfig
from diffstack_deepcache.hooks import (
    HOOK_NAME,
    SharedState,
    SkipHook,
    StepSchedule,
    deep_modules,
)

RUNNERS = "diffstack_deepcache_runners"
"""Attribute of the compiled module: its compiled DeepCache copies, one per branch, made on first use."""

COMPILE_LIKE = "diffstack_compile_like"
"""Attribute a compile offer sets on its module: compiles another module with the same settings."""


def is_compiled(denoiser: torch.nn.Module) -> bool:
    """A ``torch.compile`` module (the compile offer's), whose original UNet is ``_orig_mod``."""
    from torch._dynamo.eval_frame import OptimizedModule

    return isinstance(denoiser, OptimizedModule)


class CompiledDeepCache:
    """The shared UNet copy with DeepCache's skip hooks, compiled; called with the step's decision."""

    def __init__(self, compiled: torch.nn.Module, branch: int) -> None:
        unet = _original(compiled)
        shared = {id(tensor): tensor for tensor in itertools.chain(unet.parameters(), unet.buffers())}
        twin = copy.deepcopy(unet, shared)  # new modules, the same weights
        self.state = SharedState()
        for name, module in deep_modules(twin, branch):
            HookRegistry.check_if_exists_or_initialize(module).register_hook(
                SkipHook(self.state, name), HOOK_NAME
            )
        compile_like: Callable[[torch.nn.Module], torch.nn.Module] | None = getattr(
            compiled, COMPILE_LIKE, None
        )
        # A compiled module from another offer: its settings are unknown, so the copy runs eager.
        self.module = compile_like(twin) if compile_like is not None else twin
        self.compiled = compile_like is not None

    def __call__(self, cached: bool, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        self.state.skipping = cached
        if not cached:
            self.state.outputs.clear()  # the full graph always starts from an empty store
        output = self.module(*args, **kwargs)
        if not cached and self.compiled:
            # CUDA-graph outputs live in the graph's pool and the next replay overwrites them.
            for key, value in self.state.outputs.items():
                self.state.outputs[key] = tree_map(_own_copy, value)
        return output


def _original(compiled: torch.nn.Module) -> torch.nn.Module:
    module = compiled._orig_mod
    assert isinstance(module, torch.nn.Module)
    return module


def _own_copy(value: Any) -> Any:
    return value.clone() if isinstance(value, torch.Tensor) else value


class CompiledDeepCacheHandle:
    """DeepCache for one request on a compiled UNet: ``reset_state()`` per generation, ``remove()`` after."""

    def __init__(self, compiled: torch.nn.Module, config: DeepCacheConfig) -> None:
        if getattr(compiled.forward, "deepcache_dispatch", False):
            raise RuntimeError("DeepCache is already attached to this UNet: remove() that handle first")
        runners: dict[int, CompiledDeepCache] = vars(compiled).setdefault(RUNNERS, {})
        branch = int(config.branch)
        deep_modules(_original(compiled), branch)  # checks the branch before anything is copied
        if branch not in runners:
            runners[branch] = CompiledDeepCache(compiled, branch)
        self._runner = runners[branch]
        self._schedule = StepSchedule(config)
        self._compiled = compiled
        self._forward = compiled.forward

        def dispatch(*args: Any, **kwargs: Any) -> Any:
            sample = args[0] if args else kwargs["sample"]
            return self._runner(self._schedule.next_is_cached(sample), args, kwargs)

        dispatch.deepcache_dispatch = True  # type: ignore[attr-defined]
        compiled.forward = dispatch

    def reset_state(self) -> None:
        """Forget the cached features and the step count: the next call is a full step."""
        self._schedule.reset()
        self._runner.state.reset()

    def remove(self) -> None:
        """Give the compiled module its own forward back and drop the cached features."""
        self._compiled.forward = self._forward
        self.reset_state()
