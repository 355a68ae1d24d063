"""The six hook specifications that plugins implement.

A plugin is any module or object with functions marked ``@hookimpl`` and named after a spec below,
registered through the ``diffstack`` entry-point group::

    [project.entry-points.diffstack]
    myplugin = "diffstack_myplugin"

Every hook *offers*: it returns a list of offers (possibly empty), never chooses. The host calls
each plugin's implementation separately, keeps each offer tied to the plugin that made it, probes,
checks numbers against the reference, measures and composes (see :mod:`diffstack.compose`). A hook
that raises is recorded against its plugin and skipped; the others still compose.

Implementations take keyword arguments only, may accept any subset of a spec's arguments, and must
not give their parameters defaults (pluggy does not pass them; the host refuses such a plugin at
load). A hook returns one offer, a list of offers or ``None``; anything else fails that plugin's
answer. A build may return its object wrapped in :class:`~diffstack.types.Built` to add notes to the
report.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from diffstack.types import (
        AttentionOffer,
        CompileOffer,
        DenoiserWrapperOffer,
        EncoderOffer,
        ModelInfo,
        SamplerOffer,
        SigmasOffer,
    )

PROJECT_NAME = "diffstack"
"""The pluggy project name and the entry-point group: one string, as pytest does."""

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)

HOOK_NAMES = (
    "select_attention",
    "build_sigmas",
    "select_sampler",
    "encode_prompt",
    "wrap_denoiser",
    "compile_model",
)


# -------------------------------------------------------------------------------------------------
# Attention
# -------------------------------------------------------------------------------------------------


@hookspec
def select_attention(model: ModelInfo) -> list[AttentionOffer]:
    """Offer attention kernels for ``model``.

    :param model: the loaded model's facts, including every attention shape it uses.
    :return: offers, each with a ``supports`` predicate per :class:`~diffstack.types.AttentionShape`.

    Results are exclusive per shape: for every attention shape the host keeps the offers that probe
    yes, support the shape and match PyTorch SDPA within tolerance, then picks the fastest measured
    (priority breaks ties). The other accepted offers stay behind the winner, fastest first: a call
    that raises at run time, or meets a shape its kernel does not serve, runs the next one that
    serves it, and SDPA last (the report's notes show each order). Shapes no offer serves use SDPA.

    .. versionadded:: 0.1
    """


# -------------------------------------------------------------------------------------------------
# Noise schedule
# -------------------------------------------------------------------------------------------------


@hookspec
def build_sigmas(model: ModelInfo) -> list[SigmasOffer]:
    """Offer named noise schedules (``karras``, ``ays``, ...) for ``model``.

    :param model: the loaded model's facts; offers list the families they suit.
    :return: offers whose ``build(steps, scheduler)`` gives ``steps + 1`` sigmas ending in 0, or
        ``None`` for the scheduler's own.

    Results are named, not exclusive: every offer that probes yes is available, a request picks one
    by name, and ``auto`` takes the highest-priority one for the model's family.

    .. versionadded:: 0.1
    """


# -------------------------------------------------------------------------------------------------
# Samplers
# -------------------------------------------------------------------------------------------------


@hookspec
def select_sampler(model: ModelInfo) -> list[SamplerOffer]:
    """Offer named samplers that combine the two halves of classifier-free guidance themselves
    (CFG++, say), beside the built-in ones (``euler``, ``dpmpp_2m``, ...).

    :param model: the loaded model's facts; offers list the families they suit.
    :return: offers whose ``start()`` gives a fresh step function for one trajectory, called once a
        step with the unconditional and the conditional noise predictions.

    Results are named, not exclusive: every offer that probes yes and passes the numeric check is
    available, and a request picks one by its ``sampler`` name, with a guidance scale in the range
    of the offer's :class:`~diffstack.types.GuidanceRule`. The check runs two steps on known tensors:
    the first must be the Euler step of the guided probability-flow ODE at the scale its rule implies
    (for CFG++ at ``λ``, ordinary CFG at ``λσ/(σ − σ_next)``), and the step to σ = 0 must land on the
    guided data estimate. A name the built-in samplers use is refused.

    .. versionadded:: 0.2
    """


# -------------------------------------------------------------------------------------------------
# Prompt encoding
# -------------------------------------------------------------------------------------------------


@hookspec
def encode_prompt(model: ModelInfo) -> list[EncoderOffer]:
    """Offer wrappers around the pipeline's own prompt encoder (a cache, say).

    :param model: the loaded model's facts, including a content digest of its text encoders.
    :return: offers whose ``wrap(inner, model)`` returns an encoder with the same contract.

    Results chain: every offer that probes yes wraps the encoder, the highest priority outermost.
    Each encoder maps a :class:`~diffstack.types.PromptSpec` to the pipeline keyword arguments that
    carry the embeddings (``prompt_embeds=`` and friends).

    .. versionadded:: 0.1
    """


# -------------------------------------------------------------------------------------------------
# Denoiser wrappers
# -------------------------------------------------------------------------------------------------


@hookspec
def wrap_denoiser(model: ModelInfo) -> list[DenoiserWrapperOffer]:
    """Offer stateful wrappers for the UNet or transformer (DeepCache, first-block cache, ...).

    :param model: the loaded model's facts; offers list the denoiser kinds they suit.
    :return: offers whose ``apply(denoiser, options)`` attaches the wrapper for one generation.

    Results stack: every offer that probes yes is available; a request enables the ones it names,
    within the server's policy, and they are applied in priority order (highest first) and reset
    before each generation.

    .. versionadded:: 0.1
    """


# -------------------------------------------------------------------------------------------------
# Compilation
# -------------------------------------------------------------------------------------------------


@hookspec
def compile_model(model: ModelInfo) -> list[CompileOffer]:
    """Offer ways to execute the denoiser (eager, ``torch.compile``, CUDA graphs, stable-fast, ...).

    :param model: the loaded model's facts.
    :return: offers whose ``build(denoiser, model)`` returns the module that replaces the denoiser.

    Results are exclusive: the host builds each offer that probes yes, checks its output against
    eager execution, times it (recording how long the build took) and keeps the fastest.

    .. versionadded:: 0.1
    """
