"""diffstack: a diffusion image service whose speed comes from plugins that the host measures.

This package's top level is the plugin API: everything a plugin needs, and the only import a plugin
makes from diffstack (a CI contract checks that). It is light on purpose: importing it loads the hook
markers and the offer types, never torch, diffusers or the engine.
"""

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

from diffstack.hookspecs import hookimpl
from diffstack.options import Ge, Gt, Interval, Le, Lt, OptionProblem, OptionsError, parse_options
from diffstack.probes import (
    all_of,
    head_dim_in,
    installed_version,
    needs_cuda,
    needs_distribution,
    needs_module,
)
from diffstack.types import (
    AttentionFn,
    AttentionOffer,
    AttentionShape,
    Availability,
    Built,
    CompileOffer,
    CompileTarget,
    DenoiserKind,
    DenoiserWrapper,
    DenoiserWrapperOffer,
    EncoderOffer,
    Family,
    GuidanceRule,
    ModelInfo,
    Offer,
    Probe,
    PromptEmbeddings,
    PromptEncoder,
    PromptSpec,
    SamplerOffer,
    SamplerStep,
    SigmasOffer,
    always_available,
    supports_every_shape,
)

if TYPE_CHECKING:
    from diffstack.vae import VaeDecode


def __getattr__(name: str) -> object:
    """``VaeDecode`` (a torch module) loads on first use: importing the API must not import torch."""
    if name == "VaeDecode":
        from diffstack.vae import VaeDecode

        return VaeDecode
    raise AttributeError(f"module 'diffstack' has no attribute {name!r}")


try:
    __version__ = version("diffstack")
except PackageNotFoundError:  # a source tree on sys.path without an install
    __version__ = "0+unknown"

__all__ = [
    "AttentionFn",
    "AttentionOffer",
    "AttentionShape",
    "Availability",
    "Built",
    "CompileOffer",
    "CompileTarget",
    "DenoiserKind",
    "DenoiserWrapper",
    "DenoiserWrapperOffer",
    "EncoderOffer",
    "Family",
    "Ge",
    "Gt",
    "GuidanceRule",
    "Interval",
    "Le",
    "Lt",
    "ModelInfo",
    "Offer",
    "OptionProblem",
    "OptionsError",
    "Probe",
    "PromptEmbeddings",
    "PromptEncoder",
    "PromptSpec",
    "SamplerOffer",
    "SamplerStep",
    "SigmasOffer",
    "VaeDecode",
    "__version__",
    "all_of",
    "always_available",
    "head_dim_in",
    "hookimpl",
    "installed_version",
    "needs_cuda",
    "needs_distribution",
    "needs_module",
    "parse_options",
    "supports_every_shape",
]
