"""A thread-safe LRU of prompt embeddings, bounded by the bytes of the tensors it holds."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable, Mapping

import torch

from diffstack import PromptEmbeddings, PromptEncoder, PromptSpec


def _nbytes(embeddings: Mapping[str, torch.Tensor]) -> int:
    return sum(t.element_size() * t.nelement() for t in embeddings.values())


def _private_copy(embeddings: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fresh tensors in a fresh dict: what the cache keeps and what each hit hands out, so no caller
    can change what the next caller gets by writing into the tensors it received."""
    return {name: tensor.detach().clone() for name, tensor in embeddings.items()}


class CachingPromptEncoder:
    """Wraps a prompt encoder with an LRU cache of its results.

    Keyed by ``model_key`` (the text encoders' content digest and the model's name) and the whole
    :class:`PromptSpec`, so every field that changes the embeddings is part of the key, including
    any added later. Encodings run outside the lock: two threads that miss the same prompt at once
    both encode it, and the second result replaces the first. A failed encoding raises through and
    stores nothing. An entry larger than ``max_bytes`` is returned but never stored.
    """

    def __init__(self, inner: PromptEncoder, *, model_key: Hashable, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"prompt_cache max_bytes must be >= 0, got {max_bytes}")
        self._inner = inner
        self._model_key = model_key
        self._max_bytes = max_bytes
        self._entries: OrderedDict[Hashable, tuple[dict[str, torch.Tensor], int]] = OrderedDict()
        self._lock = threading.Lock()
        self._bytes = 0
        self._hits = 0
        self._misses = 0
        self._evictions = 0

    def __call__(self, spec: PromptSpec) -> PromptEmbeddings:
        key = (self._model_key, spec)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                self._hits += 1
            else:
                self._misses += 1
        if entry is not None:
            return _private_copy(entry[0])  # cloned outside the lock: entries are never written
        embeddings = self._inner(spec)
        self._store(key, _private_copy(embeddings))
        return embeddings

    def _store(self, key: Hashable, embeddings: dict[str, torch.Tensor]) -> None:
        size = _nbytes(embeddings)
        if size > self._max_bytes:
            return
        with self._lock:
            previous = self._entries.pop(key, None)
            if previous is not None:
                self._bytes -= previous[1]
            self._entries[key] = (embeddings, size)
            self._bytes += size
            while self._bytes > self._max_bytes:
                _, (_, evicted) = self._entries.popitem(last=False)
                self._bytes -= evicted
                self._evictions += 1

    def stats(self) -> dict[str, float]:
        """Counters for the engine's live stats, prefixed because the engine sums every component's."""
        with self._lock:
            counters = {
                "hits": self._hits,
                "misses": self._misses,
                "evictions": self._evictions,
                "entries": len(self._entries),
                "bytes": self._bytes,
                "max_bytes": self._max_bytes,
            }
        return {f"prompt_cache_{name}": float(value) for name, value in counters.items()}
