"""Small named constraints that plugin probes share, in the spirit of diffusers' attention-backend
checks: each answers yes, or no with a reason an admin can act on, in the same words everywhere.

Nothing here imports a plugin's kernel: distributions are read from package metadata, modules are
found without importing them, and the GPU is asked only when the model is on CUDA.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from collections.abc import Callable, Collection

from packaging.version import InvalidVersion, Version

from diffstack.types import AttentionShape, Availability, ModelInfo

Capability = tuple[int, int]


def all_of(*checks: Callable[[], Availability]) -> Availability:
    """Runs ``checks`` in order up to the first refusal, which it returns; else yes, with every
    yes-reason joined. Later checks may rely on earlier ones (ask the GPU only once CUDA is there)."""
    reasons = []
    for check in checks:
        answer = check()
        if not answer.ok:
            return answer
        reasons.append(answer.reason)
    return Availability.yes("; ".join(r for r in reasons if r))


def needs_cuda(
    model: ModelInfo, minimum: Capability | None = None, maximum: Capability | None = None
) -> Availability:
    """The model is on a CUDA GPU whose compute capability lies in ``[minimum, maximum]``."""
    wanted = _capability_range(minimum, maximum)
    if not model.is_cuda:
        return Availability.no(f"needs a CUDA GPU{wanted}, found {model.device}")
    if minimum is None and maximum is None:
        return Availability.yes()
    import torch

    found = torch.cuda.get_device_capability(model.device)
    if (minimum is not None and found < minimum) or (maximum is not None and found > maximum):
        return Availability.no(f"needs a CUDA GPU{wanted}, found compute capability {_dotted(found)}")
    return Availability.yes()


def installed_version(distribution: str) -> Version | None:
    """The installed release of ``distribution`` from its metadata (nothing imported), or None."""
    try:
        return Version(importlib.metadata.version(distribution))
    except (importlib.metadata.PackageNotFoundError, InvalidVersion):
        return None


def needs_distribution(distribution: str, minimum: str | None = None, install: str = "") -> Availability:
    """``distribution`` is installed, at ``minimum`` or newer; ``install`` says how to get it."""
    version = installed_version(distribution)
    how = install or f"pip install {distribution}"
    if version is None:
        return Availability.no(f"{distribution} is not installed ({how})")
    if minimum is not None and version < Version(minimum):
        return Availability.no(f"needs {distribution} ≥ {minimum}, found {version} ({how})")
    return Availability.yes(f"{distribution} {version}")


def needs_module(module: str, install: str) -> Availability:
    """Python can find ``module`` (without importing it); ``install`` says how to get it."""
    if importlib.util.find_spec(module) is None:
        return Availability.no(f"{module} is not installed ({install})")
    return Availability.yes()


def head_dim_in(shape: AttentionShape, head_dims: Collection[int], kernel: str) -> Availability:
    """``shape``'s head dim is one ``kernel`` supports; otherwise it stays with the next offer."""
    if shape.head_dim in head_dims:
        return Availability.yes()
    supported = ", ".join(str(d) for d in sorted(head_dims))
    return Availability.no(
        f"{kernel} supports head dims {supported}; {shape.head_dim} stays with the next offer"
    )


def _capability_range(minimum: Capability | None, maximum: Capability | None) -> str:
    if minimum is not None and minimum == maximum:
        return f" with compute capability {_dotted(minimum)}"
    if minimum is not None and maximum is not None:
        return f" with compute capability {_dotted(minimum)}-{_dotted(maximum)}"
    if minimum is not None:
        return f" with compute capability ≥ {_dotted(minimum)}"
    if maximum is not None:
        return f" with compute capability ≤ {_dotted(maximum)}"
    return ""


def _dotted(capability: Capability) -> str:
    return f"{capability[0]}.{capability[1]}"
