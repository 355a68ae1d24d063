"""Context parallelism across GPUs (Ulysses, ring) offered as ways to execute a transformer denoiser.

The hook only describes the offers; the probe (is there a process group of several GPUs?) lives in
:mod:`diffstack_context_parallel.support`, and the parallel denoiser (diffusers'
``enable_parallelism`` on a weight-sharing twin) in :mod:`diffstack_context_parallel.parallel`,
imported when an offer is built.
"""

from __future__ import annotations

from functools import partial

from diffstack import CompileOffer, ModelInfo, hookimpl
from diffstack_context_parallel.support import MODES, build, probe


@hookimpl
def compile_model(model: ModelInfo) -> list[CompileOffer]:
    return [
        CompileOffer(
            name=f"context_parallel_{mode}",
            # Below eager (0): on a measured tie one GPU's own execution wins (no collectives to fail).
            priority=-20,
            description=description,
            probe=partial(probe, mode),
            build=partial(build, mode),
        )
        for mode, description in MODES.items()
    ]
