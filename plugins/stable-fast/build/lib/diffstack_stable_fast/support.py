"""Whether an installed stable-fast can run with this torch, decided from package metadata first.

stable-fast ships a C++/CUDA extension built against one torch minor release, so a wheel for another
torch fails at import with an undefined symbol. The probe reads the wheel's own torch pin and says
which torch it needs before trying the import.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass

import torch
from packaging.requirements import Requirement
from packaging.version import Version

from diffstack import (
    Availability,
    DenoiserKind,
    ModelInfo,
    OptionsError,
    needs_cuda,
    needs_module,
    parse_options,
)
from diffstack_stable_fast.config import StableFastOptions

DISTRIBUTIONS = ("stable-fast-pruna", "stable-fast")
"""Where ``sfast`` comes from: the maintained fork (wheels) first, then upstream (sdist)."""
FORK_TORCH = "torch>=2.9,<2.10"
"""What the newest wheels on PyPI (stable-fast-pruna 1.0.8) are pinned to."""


@dataclass(frozen=True)
class Installed:
    distribution: str
    version: str
    torch_requirement: Requirement | None


def installed() -> Installed | None:
    """The installed stable-fast distribution and its torch pin, from metadata (nothing imported)."""
    for distribution in DISTRIBUTIONS:
        try:
            metadata = importlib.metadata.metadata(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
        pins = [Requirement(line) for line in metadata.get_all("Requires-Dist") or []]
        torch_pin = next((r for r in pins if r.name == "torch" and r.marker is None), None)
        return Installed(distribution, metadata["Version"], torch_pin)
    return None


def torch_version() -> str:
    return Version(torch.__version__).public


def probe(model: ModelInfo) -> Availability:
    try:
        options = parse_options(StableFastOptions, model.plugin_options("stable_fast"))
    except OptionsError as exc:
        return Availability.no(f"bad [plugins.options.stable_fast]: {exc}")
    found = installed()
    if found is None:
        return Availability.no(
            "stable-fast not installed "
            f"(pip install stable-fast-pruna; it needs {FORK_TORCH}, found {torch_version()})"
        )
    pin = found.torch_requirement
    if pin is not None and not pin.specifier.contains(torch_version(), prereleases=True):
        return Availability.no(
            f"{found.distribution} {found.version} needs torch{pin.specifier}, found {torch_version()}"
        )
    if model.denoiser_kind is not DenoiserKind.UNET:
        return Availability.no("stable-fast compiles UNets (SD1/SD2/SDXL), not transformer models")
    cuda = needs_cuda(model)
    if not cuda.ok:
        return cuda
    triton = needs_module("triton", "option triton needs it: pip install triton, or set triton = false")
    if options.triton and not triton.ok:
        return triton
    try:
        import sfast  # noqa: F401  (a build for another torch or CUDA fails here, not mid-request)
    except Exception as exc:
        return Availability.no(
            f"{found.distribution} {found.version} does not import with torch {torch_version()}: {exc}"
        )
    return Availability.yes(f"{found.distribution} {found.version}")


def build(denoiser: torch.nn.Module, model: ModelInfo) -> torch.nn.Module:
    from diffstack_stable_fast.compiler import compile_unet

    return compile_unet(denoiser, parse_options(StableFastOptions, model.plugin_options("stable_fast")))
