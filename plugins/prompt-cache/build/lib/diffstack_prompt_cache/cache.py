"""A thread-safe LRU of prompt embeddings, bounded by the bytes of the tensors it holds."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Hashable, Mapping

import torch

from diffstack import PromptEmbeddings, PromptEncoder, PromptSpec

log = logging.getLogger(__name__)

Signature = tuple[tuple[str, tuple[int, ...], torch.dtype], ...]


def _nbytes(embeddings: Mapping[str, torch.Tensor]) -> int:
    return sum(t.element_size() * t.nelement() for t in embeddings.values())


def _signature(embeddings: Mapping[str, torch.Tensor]) -> Signature:
    return tuple(sorted((name, tuple(t.shape), t.dtype) for name, t in embeddings.items()))


def _unfit(embeddings: Mapping[str, torch.Tensor], expected: Signature | None) -> str:
    """Why embeddings must not be cached ("" when they may): a broken encoding must not be replayed."""
    for name, tensor in embeddings.items():
        if tensor.ndim == 0 or tensor.shape[0] != 1:
            return f"{name} has shape {tuple(tensor.shape)}, not a batch of one"
        if not bool(torch.isfinite(tensor).all()):
            return f"{name} holds NaN or infinite values"
    if expected is not None and _signature(embeddings) != expected:
        return f"shapes {_signature(embeddings)} differ from every earlier entry's {expected}"
    return ""


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
    stores nothing. An entry larger than ``max_bytes`` is returned but never stored, and so is one
    that looks broken: not a batch of one, not finite, or shaped unlike the entries before it (one
    model's encoder always pads to the same length, so a different shape means a broken encoding).
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
        self._signature: Signature | None = None
        self._refused = 0
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
            problem = _unfit(embeddings, self._signature)
            if problem:
                self._refused += 1
                log.warning("prompt embeddings not cached: %s", problem)
                return
            self._signature = _signature(embeddings)
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
                "refused": self._refused,
                "entries": len(self._entries),
                "bytes": self._bytes,
                "max_bytes": self._max_bytes,
            }
        return {f"prompt_cache_{name}": float(value) for name, value in counters.items()}
