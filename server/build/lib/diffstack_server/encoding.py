"""Result images are encoded on a pool of threads, off the event loop and the engine's device thread.

PNG, WebP and JPEG encoders (zlib, libwebp, libjpeg inside Pillow) release the GIL while they work,
so threads encode in parallel, and the device thread, which only launches kernels, keeps its pace:
the batcher hands finished requests to their handlers and starts the next batch at once, so the next
batch denoises while this one's images are encoded. Each image of a result is its own task, so an
eight-image request is encoded on up to eight threads.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from diffstack_client.v1 import types_pb2
from diffstack_server import convert

if TYPE_CHECKING:
    from diffstack.engine import GenerationResult


def encode_threads(configured: int) -> int:
    """``configured``, or for 0 the CPUs this process may use, between 2 and 16."""
    if configured:
        return configured
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(2, min(16, usable))


class ImageEncoder:
    """A named pool of encoder threads; :meth:`close` when the server stops."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="diffstack-encode")

    async def result_message(
        self, result: GenerationResult, output: types_pb2.OutputOptions, extra_timings: Mapping[str, float]
    ) -> types_pb2.GenerationResult:
        """The wire form of ``result``, its images encoded in parallel as ``output`` asks."""
        loop = asyncio.get_running_loop()
        options = convert.EncodeOptions.from_output(output)
        images = await asyncio.gather(
            *(loop.run_in_executor(self._pool, convert.encode_image, g.image, options) for g in result.images)
        )
        return convert.result_message(result, list(images), extra_timings)

    def close(self) -> None:
        """Finish the encodes under way; take no more."""
        self._pool.shutdown(wait=False, cancel_futures=False)
