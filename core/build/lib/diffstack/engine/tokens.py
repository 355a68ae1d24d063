"""Counting a prompt's tokens for validation, without touching the tokenizer the engine encodes with.

A fast tokenizer keeps its padding and truncation settings as mutable state that every call rewrites:
shared between validation (``truncation=False``) and the engine (truncating to 77) on two threads,
10-13% of valid requests failed and over-long prompts slipped through. So validation counts with its
own copy, one call at a time.
"""

from __future__ import annotations

import copy
import threading
from typing import Any


class TokenCounter:
    """Counts tokens with a private copy of a tokenizer; safe to call from any thread."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = copy.deepcopy(tokenizer)
        self._lock = threading.Lock()

    def __call__(self, text: str) -> int:
        """The number of tokens ``text`` encodes to, with the begin and end tokens, untruncated."""
        with self._lock:
            return len(self._tokenizer(text, truncation=False).input_ids)
