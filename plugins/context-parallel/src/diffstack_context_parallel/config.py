"""The plugin's options (``[plugins.options.context_parallel]``), read by :func:`diffstack.parse_options`."""

from __future__ import annotations

from dataclasses import dataclass

OPTIONS = "context_parallel"


@dataclass(frozen=True)
class ContextParallelOptions:
    """Options of the context-parallel offers."""

    compile: bool = False
    """Also ``torch.compile`` (default mode) the parallel denoiser. On two H200s it took FLUX.1's step
    from 116 ms (Ulysses-2 eager) to 85.6 ms, after a compile of about 100 s at each cold start; off by
    default so that a first start stays short."""

    modes: str = "ulysses,ring"
    """The offers to try, comma-separated; each costs a build, a check and a timing (and a compile
    with ``compile``) at start-up. Ulysses measured faster than ring on two NVLink H200s (116 vs 123
    ms a FLUX step)."""

    allow_cpu: bool = False
    """Accept a CPU process group (gloo): for tests and smoke runs; it is never faster than one process."""

    def wanted(self, mode: str) -> bool:
        return mode in {m.strip() for m in self.modes.split(",")}
