"""First-block cache on a compiled transformer: each block its own compiled region, the decision eager.

The compile offer's module (``torch.compile`` of the whole transformer, CUDA graphs on CUDA) cannot
take the cache's hooks per request (a recompile per request), and one graph cannot skip half of
itself on a per-step decision. So, as DeepCache does for UNets, once per compiled transformer a copy
that shares every parameter and buffer is made, and each of its transformer blocks' ``forward`` is
compiled on its own with the compile offer's settings (``diffstack_compile_like``): a regional
compile. A request attaches diffusers' first-block cache (:class:`FirstBlockCacheHandle`, the very
code of the eager path) to that copy, so the residual comparison and the skip run in Python between
the compiled blocks, and a cache hit runs no block after the first. The compiled module's ``forward``
is swapped for the copy's while the request runs, and put back on ``remove()``; so is the
transformer's ``cache_context``, which the pipeline enters on the compiled module (it reaches the
original transformer), so that each context (``cond``, ``uncond``) keeps its own cache on the copy.

Compiled block outputs are cloned: CUDA-graph outputs live in the graph's pool and the next replay
overwrites them, while the cache keeps the first block's output and residuals across steps.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from typing import Any, cast

import torch
from torch.utils._pytree import tree_map

from diffstack_first_block_cache.cache import FirstBlockCacheHandle

TWIN = "diffstack_first_block_cache_twin"
"""Attribute of the compiled module: its regionally compiled copy, made on first use."""

COMPILE_LIKE = "diffstack_compile_like"
"""Attribute a compile offer sets on its module: compiles another module with the same settings."""

BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks")
"""Where diffusers' first-block cache finds a transformer's blocks (FLUX names both)."""


def is_compiled(denoiser: torch.nn.Module) -> bool:
    """A ``torch.compile`` module (the compile offer's), whose original transformer is ``_orig_mod``."""
    from torch._dynamo.eval_frame import OptimizedModule

    return isinstance(denoiser, OptimizedModule)


def regional_twin(compiled: torch.nn.Module) -> torch.nn.Module:
    """The compiled transformer's copy whose blocks are compiled one by one (made once, then kept)."""
    twin = vars(compiled).get(TWIN)
    if isinstance(twin, torch.nn.Module):
        return twin
    original = compiled._orig_mod
    assert isinstance(original, torch.nn.Module)
    shared = {id(t): t for t in itertools.chain(original.parameters(), original.buffers())}
    twin = copy.deepcopy(original, shared)  # new modules, the same weights
    compile_like: Callable[[Any], Any] | None = getattr(compiled, COMPILE_LIKE, None)
    # A compiled module from another offer: its settings are unknown, so the copy runs eager.
    if compile_like is not None:
        for name in BLOCK_LISTS:
            for block in getattr(twin, name, ()):
                block.forward = _owning_outputs(compile_like(block.forward))
    vars(compiled)[TWIN] = twin
    return twin


def _owning_outputs(forward: Callable[..., Any]) -> Callable[..., Any]:
    def run(*args: Any, **kwargs: Any) -> Any:
        return tree_map(_own_copy, forward(*args, **kwargs))

    return run


def _own_copy(value: Any) -> Any:
    return value.clone() if isinstance(value, torch.Tensor) else value


class CompiledFirstBlockCacheHandle:
    """The first-block cache for one request on a compiled transformer (its regional copy runs)."""

    def __init__(self, compiled: torch.nn.Module, threshold: float) -> None:
        if getattr(compiled.forward, "first_block_cache_dispatch", False):
            raise RuntimeError("first-block cache is already attached to this transformer: remove() it first")
        twin = regional_twin(compiled)
        self._cache = FirstBlockCacheHandle(twin, threshold)
        self._compiled = compiled
        self._forward = compiled.forward
        self._original = compiled._orig_mod
        vars(self._original)["cache_context"] = twin.cache_context

        def dispatch(*args: Any, **kwargs: Any) -> Any:
            return twin(*args, **kwargs)

        dispatch.first_block_cache_dispatch = True  # type: ignore[attr-defined]
        compiled.forward = cast(Any, dispatch)

    def reset_state(self) -> None:
        """Forget the cached residuals: the next call of each context runs every block."""
        self._cache.reset_state()

    def remove(self) -> None:
        """Give the compiled module its own forward back and detach the cache from the copy."""
        self._compiled.forward = self._forward
        vars(self._original).pop("cache_context", None)
        self._cache.remove()
