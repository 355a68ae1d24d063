"""A loaded model with its composed stack: load, measure, compose, report, all once per model."""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import structlog
import torch

from diffstack.attention import capture_attention_shapes, install_attention
from diffstack.compose import AttentionDecision, ComposedStack, ModelUnderTest, compose_stack
from diffstack.compose.slots import agreed_across_ranks
from diffstack.config import Settings
from diffstack.decisions import Decision, DecisionStore, decision_key, restricted_host, same_choice
from diffstack.engine.families import FamilyAdapter, Pipeline, adapter_for
from diffstack.engine.loading import ModelCard, detect_family, load_pipeline
from diffstack.engine.loras import LoraCatalogue, LoraSlot
from diffstack.engine.samplers import SAMPLERS
from diffstack.engine.tokens import TokenCounter
from diffstack.plugins import PluginHost
from diffstack.types import Family, ModelInfo, PromptEmbeddings, PromptSpec, StackReport

log = structlog.get_logger(__name__)


@dataclass
class LoadedModel:
    """One model in memory. ``lock`` serialises pipeline calls: schedulers and wrappers hold state."""

    name: str
    path: Path
    pipeline: Pipeline
    adapter: FamilyAdapter
    info: ModelInfo
    card: ModelCard
    stack: ComposedStack
    report: StackReport
    lock: threading.Lock
    decision_key: dict[str, str] | None = None
    """The key its stack decision is kept under (None when it is not kept): decisions derived from
    the stack, such as the server's batch size, are kept under it too."""
    startup: dict[str, float] = field(default_factory=dict)
    """Seconds its loading took, by phase (``load_s``, ``compose_s``, ``warmup_s``)."""
    loras: LoraSlot | None = None
    """The LoRA hot-swap slot; None when the model takes no LoRAs (none fitted at load, or off)."""
    unwarmed_wrappers: list[str] = field(default_factory=list)
    """Wrappers that run on the compiled denoiser and have not run yet: each compiles its own graphs
    on its first use, which the engine's warm-up leaves to the server (after SERVING)."""

    def denoiser_for(self, with_wrappers: bool) -> torch.nn.Module:
        """The compiled denoiser, or the eager one when wrappers must hook into its blocks."""
        if with_wrappers or self.stack.compiled is None:
            return self._eager
        return self.stack.compiled

    def __post_init__(self) -> None:
        self._eager = self.adapter.denoiser(self.pipeline)
        if self.loras is not None:
            self.loras.settle(compiled=self.stack.compiled not in (None, self._eager))
        self.scheduler_config = self.pipeline.scheduler.config
        """The model's own scheduler config: every sampler is built from it, never from the last one."""
        self.count_tokens = TokenCounter(self.pipeline.tokenizer)
        """Validation's own tokenizer: the pipeline's belongs to the engine thread."""

    @property
    def default_size(self) -> tuple[int, int]:
        return default_size(self.pipeline, self.adapter, self.card)

    @property
    def default_steps(self) -> int:
        return self.card.default_steps or self.adapter.default_steps

    @property
    def default_guidance(self) -> float:
        return (
            self.card.default_guidance
            if self.card.default_guidance is not None
            else self.adapter.default_guidance
        )


def resolve_device(settings: Settings) -> str:
    if settings.engine.device != "auto":
        return settings.engine.device
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(settings: Settings, device: str, family: Family) -> torch.dtype:
    if settings.engine.dtype != "auto":
        return getattr(torch, settings.engine.dtype)
    return adapter_for(family).dtype(device)


def load_model(name: str, path: Path, host: PluginHost, settings: Settings) -> LoadedModel:
    """Load ``path``, measure its attention shapes and compose its stack."""
    started = time.perf_counter()
    family = detect_family(path)
    device = resolve_device(settings)
    pipeline = load_pipeline(path, family, device, resolve_dtype(settings, device, family))
    card = ModelCard.read(path if path.is_dir() else path.parent)
    # Before composing: the slot must be in the denoiser the stack measures and compiles.
    loras = LoraSlot.prepare(
        adapter_for(family).denoiser(pipeline),
        settings.engine.lora_rank,
        LoraCatalogue.for_models_dir(settings.engine.models_dir),
        settings.engine.lora_cache,
    )
    loaded = time.perf_counter()
    model = compose_model(name, path, pipeline, family, card, host, settings, loras)
    model.startup.update(load_s=loaded - started, compose_s=time.perf_counter() - loaded)
    return model


def compose_model(
    name: str,
    path: Path,
    pipeline: Pipeline,
    family: Family,
    card: ModelCard,
    host: PluginHost,
    settings: Settings,
    loras: LoraSlot | None = None,
) -> LoadedModel:
    """Measure a pipeline's attention shapes and compose its stack (benchmarks call this directly)."""
    adapter = adapter_for(family)
    denoiser = adapter.denoiser(pipeline)
    device, dtype = str(denoiser.device), denoiser.dtype
    measure = {"always": True, "never": False}.get(settings.compose.measure, device.startswith("cuda"))

    width, height = default_size(pipeline, adapter, card)
    # Seeded, so every process draws the same inputs: the ranks of a context-parallel group must call
    # their denoisers on identical inputs (and a composition becomes reproducible).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SAMPLE_INPUTS_SEED)
        inputs = adapter.sample_inputs(pipeline, settings.compose.batch, height, width)
    shapes = capture_attention_shapes(denoiser, lambda: denoiser(**inputs, return_dict=False))
    info = ModelInfo(
        name=name,
        family=family,
        denoiser_kind=adapter.denoiser_kind,
        device=device,
        dtype=dtype,
        attention_shapes=tuple(sorted(set(shapes.values()), key=lambda s: s.key)),
        text_encoder_digest=_digest(adapter.text_encoders(pipeline)),
        options=settings.plugins.options,
    )
    under_test = ModelUnderTest(
        info=info,
        denoiser=denoiser,
        denoiser_inputs=inputs,
        module_shapes=shapes,
        base_encoder=partial(_encode_without_grad, adapter, pipeline),
        scheduler=pipeline.scheduler,
        measure=measure,
        builtin_samplers=frozenset(SAMPLERS),
        **_vae_under_test(adapter, pipeline, *((height, width) if measure else VAE_CHECK_SIZE)),
    )
    key = _decision_key(host, under_test, path, settings) if _kept(settings, measure) else None
    restored = _restore(host, under_test, path, settings, key)
    if restored is not None:
        stack, report = restored
        log.info("stack restored", model=name, family=family.value, chosen=report.summary())
        return LoadedModel(
            name, path, pipeline, adapter, info, card, stack, report, threading.Lock(), key, loras=loras
        )
    stack = compose_stack(host, under_test, settings.compose, apply_attention)
    notes = [f"denoiser calls measured at batch {settings.compose.batch}, {width}x{height}"]
    if not measure:
        notes.append(
            f"timing skipped on {device} (compose.measure={settings.compose.measure}): priorities decided"
        )
    notes.extend(stack.notes)
    if under_test.vae is None:
        notes.append(
            "VAE decode not compiled: the pipeline converts the fp16 VAE to float32 around each decode"
        )
    if card.weights == "random":
        notes.append("this model's weights are random: it draws noise, not pictures")
    report = StackReport(
        model=name,
        family=family,
        device=device,
        dtype=str(dtype).removeprefix("torch."),
        measured=measure,
        notes=tuple(notes),
        slots=tuple(stack.slots),
        decided_at=time.time(),
    )
    if key is not None:
        _keep(settings, name, key, report)
    log.info("stack composed", model=name, family=family.value, chosen=report.summary())
    return LoadedModel(
        name, path, pipeline, adapter, info, card, stack, report, threading.Lock(), key, loras=loras
    )


VAE_CHECK_SIZE = (64, 64)
"""The VAE decode's check size when offers are not timed: numbers only, and a full-size decode of
the tiny test models costs seconds on a CPU (timed checks use the default size, as requests do)."""


def _vae_under_test(adapter: FamilyAdapter, pipeline: Pipeline, height: int, width: int) -> dict[str, Any]:
    """The VAE and its check's latents for the ``compile_vae`` slot; none where the pipeline upcasts it."""
    if adapter.decode_upcasts(pipeline):
        return {}
    return {"vae": pipeline.vae, "vae_latents": adapter.vae_latents(pipeline, height, width)}


def _decision_key(host: PluginHost, model: ModelUnderTest, path: Path, settings: Settings) -> dict[str, str]:
    info = model.info
    return decision_key(host, path, info.device, str(info.dtype), info.family, settings.compose)


def _kept(settings: Settings, measured: bool) -> bool:
    """Whether decisions are kept on disk: measured ones, with a ``compose.decisions_dir``."""
    return settings.compose.decisions_dir is not None and measured


def _restore(
    host: PluginHost, model: ModelUnderTest, path: Path, settings: Settings, key: dict[str, str] | None
) -> tuple[ComposedStack, StackReport] | None:
    """The stack a kept, still valid decision chose, rebuilt untimed; None to measure afresh.

    The ranks of a context-parallel group compose in lockstep (their offers' calls are collectives),
    so they restore only if every rank found a valid decision (each keeps its own folder) and rebuilt
    the same choice; otherwise they all measure afresh (a single process just asks itself)."""
    if key is None or settings.compose.decisions_dir is None:
        return None
    saved = DecisionStore(settings.compose.decisions_dir).load(model.info.name, key)
    if agreed_across_ranks({"missing": float(saved is None)})["missing"]:
        if saved is not None:
            log.warning("restored_decision_missing_on_another_rank_measuring", model=model.info.name)
        return None
    assert saved is not None
    untimed = replace(model, measure=False)
    stack = compose_stack(restricted_host(host, saved.report), untimed, settings.compose, apply_attention)
    if agreed_across_ranks({"differs": float(not same_choice(stack.slots, saved.report))})["differs"]:
        log.warning("restored_decision_differs_measuring", model=model.info.name)
        return None
    return stack, replace(saved.report, restored=True, decided_at=saved.decided_at)


def _keep(settings: Settings, model: str, key: dict[str, str], report: StackReport) -> None:
    """Save a measured decision for the next start (a failure to write is logged, never fatal)."""
    assert settings.compose.decisions_dir is not None
    store = DecisionStore(settings.compose.decisions_dir)
    try:
        store.save(model, key, Decision(report, report.decided_at or time.time()))
    except OSError as exc:
        log.warning("decision_not_saved", directory=str(store.directory), error=str(exc))


SAMPLE_INPUTS_SEED = 0
"""The seed of the random denoiser inputs that composition checks and times offers on."""


def apply_attention(denoiser: torch.nn.Module, attention: AttentionDecision) -> None:
    """Put the chosen kernels in place: processors per module (UNets) or the dispatch backend."""
    if attention.backend is not None:
        denoiser.set_attention_backend(attention.backend)  # type: ignore[operator]
    elif attention.plan:
        install_attention(denoiser, attention.plan)


def default_size(pipeline: Pipeline, adapter: FamilyAdapter, card: ModelCard) -> tuple[int, int]:
    """The model card's size, else the family's."""
    if card.default_width and card.default_height:
        return card.default_width, card.default_height
    return adapter.default_size(pipeline)


def _encode_without_grad(adapter: FamilyAdapter, pipeline: Pipeline, spec: PromptSpec) -> PromptEmbeddings:
    """The pipeline's own encoder; outside ``__call__`` it would track gradients, so switch that off."""
    with torch.no_grad():
        return adapter.encode(pipeline, spec)


def _digest(modules: list[torch.nn.Module]) -> str:
    """A content hash of the text encoders' weights: the prompt cache's key, stable across restarts."""
    digest = hashlib.sha256()
    for module in modules:
        for name, tensor in sorted(module.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]
