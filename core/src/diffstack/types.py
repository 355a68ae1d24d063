"""The data that passes between plugins and the host.

Plugins *offer*; the host decides. Every hook returns offers (frozen dataclasses below) that carry
their own priority and capability probe, and a callable that builds or applies the optimization only
when the host has chosen it. Heavy imports belong inside those callables, never at import time.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

if TYPE_CHECKING:
    import torch
    from diffusers import SchedulerMixin

    from diffstack.options import OptionProblem


class Family(enum.StrEnum):
    """Model families the engine knows; each has an engine adapter."""

    SD1 = "sd1"
    SD2 = "sd2"
    SDXL = "sdxl"
    FLUX = "flux"


class DenoiserKind(enum.StrEnum):
    """The denoiser's architecture, which decides how attention and caches attach to it."""

    UNET = "unet"
    TRANSFORMER = "transformer"


@dataclass(frozen=True)
class AttentionShape:
    """One attention call site's geometry (batch excluded): what a kernel must support."""

    heads: int
    head_dim: int
    query_len: int
    key_len: int

    @property
    def key(self) -> str:
        """A short stable label, used as the scope of per-shape decisions in the report."""
        return f"h{self.heads}xd{self.head_dim} q{self.query_len} k{self.key_len}"


@dataclass(frozen=True)
class ModelInfo:
    """What a plugin may know about the model it is offering for.

    Passed to every hook and probe. It is plain data: plugins never get the pipeline at offer time,
    so an offer cannot allocate memory or touch weights before the host has chosen it.
    """

    name: str
    family: Family
    denoiser_kind: DenoiserKind
    device: str
    dtype: torch.dtype
    attention_shapes: tuple[AttentionShape, ...] = ()
    text_encoder_digest: str = ""
    options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def plugin_options(self, plugin: str) -> Mapping[str, Any]:
        """The configuration section that an admin wrote for one plugin (empty when none)."""
        return self.options.get(plugin, {})

    @property
    def is_cuda(self) -> bool:
        return self.device.startswith("cuda")


@dataclass(frozen=True)
class Availability:
    """A probe's answer: yes, or no with a reason an admin can act on."""

    ok: bool
    reason: str = ""

    @classmethod
    def yes(cls, reason: str = "") -> Availability:
        return cls(True, reason)

    @classmethod
    def no(cls, reason: str) -> Availability:
        return cls(False, reason)


Probe = Callable[[ModelInfo], Availability]

BuiltT = TypeVar("BuiltT")


@dataclass(frozen=True)
class Built(Generic[BuiltT]):
    """What a build returned, with notes for the report (the mode it chose, a cache it loaded).

    A ``build`` may return its object bare or wrapped in ``Built``; the notes travel, unchanged, in
    the candidate's ``notes`` to the CLI, the logs and the diagnostics RPC.
    """

    value: BuiltT
    notes: tuple[str, ...] = ()


def always_available(model: ModelInfo) -> Availability:
    """The default probe, for offers that work everywhere the engine runs."""
    return Availability.yes()


@dataclass(frozen=True, kw_only=True)
class Offer:
    """What every offer has: a name unique within its slot, a priority and a probe.

    The priority breaks ties between offers whose measured times are within tolerance and orders
    stackable slots (higher first); it never replaces measurement.
    """

    name: str
    priority: int = 0
    description: str = ""
    probe: Probe = always_available


# ---------------------------------------------------------------------------------------------
# select_attention
# ---------------------------------------------------------------------------------------------


class AttentionFn(Protocol):
    """An attention kernel in PyTorch SDPA's layout: (batch, heads, seq, head_dim), no mask."""

    def __call__(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor: ...


def supports_every_shape(shape: AttentionShape) -> Availability:
    return Availability.yes()


@dataclass(frozen=True, kw_only=True)
class AttentionOffer(Offer):
    """An attention kernel. The host checks it per attention shape against SDPA and times it.

    ``build`` imports the kernel and returns the function; ``supports`` says which shapes it serves,
    so a kernel without head dim 160 still serves the model's other layers. ``diffusers_backend``
    names the diffusers attention-dispatch backend that serves transformer denoisers (FLUX).
    """

    build: Callable[[ModelInfo], AttentionFn | Built[AttentionFn]]
    supports: Callable[[AttentionShape], Availability] = supports_every_shape
    diffusers_backend: str | None = None


# ---------------------------------------------------------------------------------------------
# build_sigmas
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class SigmasOffer(Offer):
    """A named noise schedule. A request picks one by name, or ``auto`` for the best for its family.

    ``build(steps, scheduler)`` returns ``steps + 1`` descending sigmas ending in 0 for the
    pipeline's ``sigmas=`` argument, or ``None`` to let the scheduler compute its own.
    """

    families: frozenset[Family] = frozenset(Family)
    build: Callable[[int, SchedulerMixin], list[float] | None]


# ---------------------------------------------------------------------------------------------
# select_sampler
# ---------------------------------------------------------------------------------------------


class GuidanceRule(enum.StrEnum):
    """How a sampler uses the request's guidance scale; it decides the scale's range and the
    host's numeric check of the sampler's steps."""

    CFG = "cfg"
    """Ordinary classifier-free guidance: the step denoises and re-noises with
    ``ε_u + w(ε_c − ε_u)``; ``w`` is the request's guidance in [0, 50]."""
    CFG_PP = "cfg++"
    """CFG++ (Chung et al., 2024): the step denoises with ``ε_u + λ(ε_c − ε_u)`` and re-noises with
    ``ε_u``; ``λ`` is the request's guidance in [0, 1]."""

    @property
    def guidance_range(self) -> tuple[float, float]:
        """The guidance scales a request may ask of a sampler under this rule."""
        return (0.0, 1.0) if self is GuidanceRule.CFG_PP else (0.0, 50.0)


class SamplerStep(Protocol):
    """One step of a sampler in the ε/σ parameterisation (``x = x0 + σ·ε``), from both halves of
    one classifier-free-guidance call: ``x`` at noise level ``sigma`` to ``sigma_next`` (0 last)."""

    def __call__(
        self,
        x: torch.Tensor,
        sigma: float,
        sigma_next: float,
        eps_uncond: torch.Tensor,
        eps_cond: torch.Tensor,
        guidance: float,
    ) -> torch.Tensor: ...


@dataclass(frozen=True, kw_only=True)
class SamplerOffer(Offer):
    """A named sampler that combines the two halves of guidance itself. A request picks it by name.

    ``start()`` gives a fresh :class:`SamplerStep` for one trajectory (a multistep method keeps its
    history inside it); the host calls it once per step with the unconditional and conditional
    noise predictions, on the model's own sigmas (or the request's schedule). ``guidance`` says how
    the step reads the request's guidance scale, ``default_guidance`` what a request that sets none
    gets (``None``: the model's default, for ``CFG`` samplers only). ``families``: the families whose
    pipelines make a two-half guidance call (not FLUX, whose guidance is distilled into the model).
    """

    families: frozenset[Family] = frozenset({Family.SD1, Family.SD2, Family.SDXL})
    guidance: GuidanceRule = GuidanceRule.CFG
    default_guidance: float | None = None
    start: Callable[[], SamplerStep]


# ---------------------------------------------------------------------------------------------
# encode_prompt
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptSpec:
    """Everything that decides a prompt's embeddings."""

    prompt: str
    negative_prompt: str = ""
    classifier_free_guidance: bool = True
    clip_skip: int | None = None


PromptEmbeddings = Mapping[str, "torch.Tensor"]
"""Keyword arguments for the pipeline call (``prompt_embeds``, ``negative_prompt_embeds``, ...),
each with a batch dimension of one."""

PromptEncoder = Callable[[PromptSpec], PromptEmbeddings]


@dataclass(frozen=True, kw_only=True)
class EncoderOffer(Offer):
    """A wrapper around the prompt encoder. All available wrappers chain, highest priority outermost."""

    wrap: Callable[[PromptEncoder, ModelInfo], PromptEncoder]


# ---------------------------------------------------------------------------------------------
# wrap_denoiser
# ---------------------------------------------------------------------------------------------


class DenoiserWrapper(Protocol):
    """A wrapper attached to a denoiser for one generation."""

    def reset_state(self) -> None:
        """Forget everything cached, so the next generation starts clean."""

    def remove(self) -> None:
        """Detach from the denoiser, leaving it exactly as it was."""


@dataclass(frozen=True, kw_only=True)
class DenoiserWrapperOffer(Offer):
    """A stackable denoiser wrapper (a feature cache, say), enabled per request within policy.

    ``apply(denoiser, options)`` attaches it with the request's options merged over the admin's.
    ``options`` is the frozen dataclass that declares those options (see :mod:`diffstack.options`):
    the host checks a request's options against it before any plugin code runs.
    ``on_compiled``: ``apply`` also takes the compile offer's module, so a request using this
    wrapper keeps the compiled denoiser instead of falling back to the eager one.
    ``check_latent(options, latent_height, latent_width)``, given the parsed options, names the
    problem when the wrapper cannot serve a request's latent size (a multi-scale latent too small to
    downscale); the request is then refused on that option, before any work.
    """

    denoiser_kinds: frozenset[DenoiserKind] = frozenset(DenoiserKind)
    apply: Callable[[torch.nn.Module, Mapping[str, Any]], DenoiserWrapper]
    options: type | None = None
    on_compiled: bool = False
    check_latent: Callable[[Any, int, int], OptionProblem | None] | None = None


# ---------------------------------------------------------------------------------------------
# compile_model
# ---------------------------------------------------------------------------------------------


class CompileTarget(enum.StrEnum):
    """The component a compile offer executes: each target is its own exclusive slot."""

    DENOISER = "denoiser"
    """``build(denoiser, model)`` returns the module that replaces the UNet or transformer."""
    VAE_DECODE = "vae_decode"
    """``build(vae, model)`` returns a module whose ``module(latents)`` equals
    ``vae.decode(latents, return_dict=False)[0]``; the engine routes the pipeline's decode through it."""


@dataclass(frozen=True, kw_only=True)
class CompileOffer(Offer):
    """A way to execute the denoiser (or, with ``target``, the VAE decode) faster. ``build`` returns
    the module that replaces it (bare or in :class:`Built`, with notes such as the compile mode).

    ``lossy``: the offer changes the arithmetic on purpose (fp8 GEMMs, say), so the host checks it
    against ``compose.lossy_tolerance`` instead of the compile tolerance and reports its drift."""

    build: Callable[[torch.nn.Module, ModelInfo], torch.nn.Module | Built[torch.nn.Module]]
    target: CompileTarget = CompileTarget.DENOISER
    lossy: bool = False


AnyOffer = AttentionOffer | SigmasOffer | SamplerOffer | EncoderOffer | DenoiserWrapperOffer | CompileOffer


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------


class CandidateStatus(enum.StrEnum):
    """What became of one offer."""

    CHOSEN = "chosen"
    AVAILABLE = "available"  # passed every check; enabled per request (stackable, named slots)
    SLOWER = "slower"
    REJECTED = "rejected"  # the probe said no, or the numbers were wrong
    FAILED = "failed"  # raised while probing, building or running
    TIMED_OUT = "timed out"  # probing, building or checking ran past its limit (compose.*_timeout_s)


@dataclass(frozen=True)
class CandidateReport:
    """One offer's fate in one slot (and, for attention, one shape).

    ``reason`` says why it was not chosen (or why a stackable offer is available); ``notes`` carry
    what the offer itself said: its probe's "yes, because …" and its build's :class:`Built` notes.
    """

    plugin: str
    offer: str
    priority: int
    status: CandidateStatus
    reason: str = ""
    scope: str = ""
    numeric_error: float | None = None
    time_ms: float | None = None
    setup_s: float | None = None
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class SlotReport:
    """One hook's decisions: what was chosen (per scope) and every candidate."""

    slot: str
    chosen: tuple[str, ...]
    candidates: tuple[CandidateReport, ...]


class PluginStatus(enum.StrEnum):
    """Whether a plugin took part; the values are the words the CLI and the logs show."""

    LOADED = "loaded"
    FAILED = "failed"  # import, validation or registration failed; ``error`` says why
    DISABLED = "disabled"  # turned off by the allow/deny lists
    TIMED_OUT = "timed out"  # its import ran past ``plugins.import_timeout_s``


@dataclass(frozen=True)
class PluginRecord:
    """A plugin as the host saw it: the same data for the CLI, the logs and the diagnostics RPC."""

    name: str
    distribution: str
    version: str
    entry_point: str
    hooks: tuple[str, ...]
    status: PluginStatus
    error: str = ""


@dataclass(frozen=True)
class StackReport:
    """Every decision composition made for one model, immutable once built."""

    model: str
    family: Family
    device: str
    dtype: str
    measured: bool
    notes: tuple[str, ...]
    slots: tuple[SlotReport, ...]
    restored: bool = False
    """Whether this decision was read back from ``compose.decisions_dir`` instead of made now."""
    decided_at: float | None = None
    """When the decision was made (Unix seconds; for a restored one, when it was first measured)."""

    def slot(self, name: str) -> SlotReport:
        return next(s for s in self.slots if s.slot == name)

    def summary(self) -> dict[str, tuple[str, ...]]:
        """Slot name → chosen offers: the short form that travels with every generated image."""
        return {s.slot: s.chosen for s in self.slots}
