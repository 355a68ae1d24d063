"""First-block cache (ParaAttention) attached through diffusers' own cache API.

diffusers implements the technique (``FirstBlockCacheConfig``, hooks on the transformer blocks);
this module only gives it the lifetime of one request. It goes through ``enable_cache`` /
``disable_cache`` rather than calling ``apply_first_block_cache`` directly because those also
refresh the transformer's cached list of hooked children: a transformer that already ran inside a
pipeline's ``cache_context`` (any earlier generation) would otherwise never hand the new block hooks
their context, and the first cached call would fail with "No cache context is set".

diffusers' cache hooks also need every call inside ``transformer.cache_context(name)``, as its
pipelines do. A call made without one (the host's checks, a benchmark) gets a ``default`` context
from a small hook of ours on the transformer, instead of failing.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.hooks import FirstBlockCacheConfig, HookRegistry, ModelHook
from diffusers.hooks.first_block_cache import FBCHeadBlockHook
from diffusers.models.cache_utils import CacheMixin

DEFAULT_CONTEXT_HOOK = "diffstack_first_block_cache_default_context"


class FirstBlockCacheHandle:
    """First-block cache on one transformer for one request (reset per generation, removed after).

    Each ``cache_context`` name that a pipeline uses (``cond``, ``uncond``) keeps its own cache.
    """

    def __init__(self, transformer: torch.nn.Module, threshold: float) -> None:
        if not isinstance(transformer, CacheMixin):
            raise TypeError(
                f"first-block cache needs a diffusers model with cache support, got {type(transformer)}"
            )
        transformer.enable_cache(FirstBlockCacheConfig(threshold=threshold))
        self._transformer: CacheMixin | None = transformer
        self._head = _head_hook(transformer)
        self._root = HookRegistry.check_if_exists_or_initialize(transformer)
        self._root.register_hook(_DefaultContextHook(self._head[1]), DEFAULT_CONTEXT_HOOK)

    def reset_state(self) -> None:
        """Forget the cached residuals: the next call of each context runs every block."""
        module, hook = self._head
        hook.reset_state(module)

    def remove(self) -> None:
        """Remove diffusers' hooks, restoring the transformer's own forward code."""
        if self._transformer is not None:
            self.reset_state()
            self._root.remove_hook(DEFAULT_CONTEXT_HOOK, recurse=False)
            self._transformer.disable_cache()
            self._transformer = None


def _head_hook(transformer: torch.nn.Module) -> tuple[torch.nn.Module, FBCHeadBlockHook]:
    """The first block's hook: the one that owns the cache's state, shared by the other blocks."""
    for module in transformer.modules():
        registry = getattr(module, "_diffusers_hook", None)
        for hook in registry.hooks.values() if registry is not None else ():
            if isinstance(hook, FBCHeadBlockHook):
                return module, hook
    raise AssertionError("enable_cache(FirstBlockCacheConfig) attached no first-block hook")


class _DefaultContextHook(ModelHook):
    """On the transformer: runs a call made outside any ``cache_context`` in a ``default`` one."""

    def __init__(self, head: FBCHeadBlockHook) -> None:
        super().__init__()
        self.head = head

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        forward = self.fn_ref.original_forward
        try:
            self.head.state_manager.context  # noqa: B018  (raises ValueError when no context is set)
        except ValueError:
            with module.cache_context("default"):  # type: ignore[operator]
                return forward(*args, **kwargs)  # type: ignore[misc]
        return forward(*args, **kwargs)  # type: ignore[misc]
