"""One pipeline call for a batch of prepared jobs, with the composed stack applied.

Each image gets its own ``torch.Generator``, so an image with seed S is the same picture whether it
ran alone or inside a batch. Progress and cancellation go through ``callback_on_step_end``.

A batch runs in two halves so that a server can overlap them: :func:`launch_batch`, on the device
thread, encodes the prompts, denoises, decodes and converts the pixels to 8 bits on the device, and
queues their copy into pinned host memory behind a CUDA event; :meth:`PendingBatch.collect`, on any
thread, waits for that event and turns the pixels into pictures. So the device thread is free to
launch the next batch while this one's pixels travel, are checked and become images (and are
encoded and sent by the server). :func:`run_batch` does both in a row.

Never an answer of garbage: every image is checked for NaN/inf before it is returned. When the
composed stack raises or gives a non-finite image, the jobs concerned run once more on the reference
stack (SDPA attention, the eager denoiser, no wrappers, the scheduler's own sigmas, the pipeline's own
encoder), whose summary then travels with the images (a non-finite image is found only when the
batch is collected: :meth:`PendingBatch.retry` reruns those jobs, on the device thread). When the
reference stack gives NaN as well, the model itself is at fault (an fp16 VAE overflowing, say): the
job fails with :class:`ModelError` (FAILED_PRECONDITION), never OK. The stack summary of every answer
says what actually ran, run-time fallbacks included.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import structlog
import torch
from PIL import Image

from diffstack.attention import KernelAttnProcessor, KernelChain, sdpa
from diffstack.engine.families import Pipeline, batch_embeddings
from diffstack.engine.model import LoadedModel
from diffstack.engine.previews import latent_previews
from diffstack.engine.requests import (
    GeneratedImage,
    GenerationJob,
    GenerationRequest,
    GenerationResult,
    StepEvent,
)
from diffstack.engine.samplers import (
    PIPELINE_GUIDANCE,
    PLUGIN_SAMPLER_BASE,
    SAMPLERS,
    GuidanceHalves,
    Sampler,
    plugin_scheduler,
)
from diffstack.errors import DiffstackError, ModelError, OutOfMemory
from diffstack.types import DenoiserWrapper, DenoiserWrapperOffer, PromptSpec
from diffstack.vae import routed_decode

log = structlog.get_logger(__name__)

REFERENCE_SCHEDULE = "default"
Outcome = GenerationResult | DiffstackError


class _EveryJobStopped(Exception):
    """Raised inside the pipeline's step callback to end the call early."""


@dataclass
class _Ran:
    """What one pipeline call actually ran, as opposed to what the request asked for."""

    schedule: str
    wrappers: tuple[str, ...]
    reference: bool
    fallback: str = ""
    plugin_sampler: str = ""


def run_batch(model: LoadedModel, jobs: Sequence[GenerationJob]) -> list[Outcome]:
    """Run ``jobs`` (one batch key) as one pipeline call and wait for its images; see the module
    docstring for fallbacks."""
    pending = launch_batch(model, jobs)
    return pending.retry(pending.collect())


def launch_batch(model: LoadedModel, jobs: Sequence[GenerationJob]) -> PendingBatch:
    """Denoise and decode ``jobs`` (one batch key) on the device thread; returns once the pixels'
    copy to the host is queued, before it is done. A composed stack that raises is replaced by the
    reference stack here; one that gives a non-finite image, by :meth:`PendingBatch.retry`."""
    with model.lock:
        try:
            return PendingBatch(model, jobs, _launch(model, jobs, reference=False), reference=False)
        except DiffstackError:
            raise
        except Exception as exc:  # the composed stack broke at run time: the reference stack serves
            log.warning(
                "composed stack failed; retrying on the reference stack", error=str(exc), exc_info=True
            )
            reason = f"the composed stack raised {type(exc).__name__}"
            launched = _launch(model, jobs, reference=True, fallback=reason)
            return PendingBatch(model, jobs, launched, reference=True)


class PendingBatch:
    """A launched batch: :meth:`collect` its outcomes on any thread, then :meth:`retry` on the
    device thread whatever came back non-finite (a no-op when nothing did)."""

    def __init__(
        self, model: LoadedModel | None, jobs: Sequence[GenerationJob], launched: _Launched, reference: bool
    ) -> None:
        self.model = model
        self.jobs = jobs
        self._launched = launched
        self._reference = reference

    @classmethod
    def done(cls, outcomes: Sequence[Outcome]) -> PendingBatch:
        """A batch whose outcomes are known already (engines that run synchronously, tests)."""
        return cls(None, (), _Launched(list(outcomes)), reference=True)

    def collect(self) -> list[Outcome | None]:
        """Wait for the images and check them; None marks a job whose images were not all finite on
        the composed stack (to :meth:`retry`)."""
        outcomes = self._launched.collect()
        if self._reference and self.model is not None:
            return [o if o is not None else _non_finite(self.model) for o in outcomes]
        return outcomes

    def retry(self, outcomes: list[Outcome | None]) -> list[Outcome]:
        """``outcomes`` with every None rerun on the reference stack (on the device thread)."""
        retry = [i for i, outcome in enumerate(outcomes) if outcome is None]
        if retry and self.model is not None:
            reason = "the composed stack gave a non-finite image"
            log.warning("retrying on the reference stack", reason=reason, jobs=len(retry))
            model = self.model
            with model.lock:
                again = _launch(model, [self.jobs[i] for i in retry], reference=True, fallback=reason)
            for index, outcome in zip(retry, again.collect(), strict=True):
                outcomes[index] = outcome if outcome is not None else _non_finite(model)
        return [outcome for outcome in outcomes if outcome is not None]


@dataclass
class _Launched:
    """One pipeline call's results on their way to the host (``outcomes`` when known already)."""

    outcomes: list[Outcome | None] | None = None
    model: LoadedModel | None = None
    jobs: Sequence[GenerationJob] = ()
    pixels: torch.Tensor | None = None
    """Every image, 8-bit HWC, in host memory (pinned on CUDA) once ``ready`` has passed."""
    finite: torch.Tensor | None = None
    """Per image: whether all its values were finite (on the host, as ``pixels``)."""
    ready: Any = None
    """The CUDA event after the copies (None on a CPU: the copy is done already)."""
    stopped: dict[int, DiffstackError] = field(default_factory=dict)
    summary: dict[str, tuple[str, ...]] = field(default_factory=dict)
    reference: bool = False
    started: float = 0.0
    encoded: float = 0.0
    swap_s: float = 0.0
    """Seconds the LoRA swap took before encoding (0 when the LoRAs were in already)."""

    def collect(self) -> list[Outcome | None]:
        if self.outcomes is not None:
            return list(self.outcomes)
        assert self.model is not None and self.pixels is not None and self.finite is not None
        if self.ready is not None:
            self.ready.synchronize()
        finished = time.perf_counter()
        timings = {
            "lora_swap_s": self.swap_s,
            "encode_s": self.encoded - self.started - self.swap_s,
            "pipeline_s": finished - self.encoded,
            "total_s": finished - self.started,
        }
        return _split(
            self.model,
            self.jobs,
            self.pixels.numpy(),
            self.finite.numpy(),
            self.stopped,
            timings,
            self.summary,
            self.reference,
        )


def _non_finite(model: LoadedModel) -> ModelError:
    log.error("the reference stack gave a non-finite image", model=model.name)
    return ModelError(
        f"model {model.name!r} produced a non-finite image (NaN or inf) even on the reference stack; "
        "its weights or dtype do not suit this request (an fp16 VAE that overflows, say)"
    )


def _launch(
    model: LoadedModel, jobs: Sequence[GenerationJob], reference: bool, fallback: str = ""
) -> _Launched:
    """One pipeline call, up to the queued copy of its pixels to the host."""
    request = jobs[0].request
    stopped: dict[int, DiffstackError] = {}
    started = time.perf_counter()
    swap_s = model.loras.activate(request.loras) if model.loras is not None else 0.0
    try:
        embeddings = _encode(model, jobs, reference)
        encoded = time.perf_counter()
        pipeline = _pipeline_for(model, request.init_image is not None, request.mask is not None)
        sampler, scheduler, halves = _sampler_for(model, request)
        pipeline.scheduler = scheduler
        schedule = REFERENCE_SCHEDULE if reference else request.schedule
        schedule_arguments, schedule_ran = _schedule_arguments(
            model, schedule, request.steps, scheduler, sampler
        )
        arguments = {
            **embeddings,
            **schedule_arguments,
            **_image_arguments(jobs),
            "height": request.height,
            "width": request.width,
            "guidance_scale": _guidance(jobs) if halves is None else PIPELINE_GUIDANCE,
            "generator": [torch.Generator("cpu").manual_seed(s) for job in jobs for s in job.request.seeds],
            "callback_on_step_end": _step_callback(model, jobs, stopped),
            "output_type": "pt",
        }
        wrappers = {} if reference else request.wrappers
        with _denoiser_stack(model, pipeline, wrappers, reference, halves) as wrappers_ran:
            images = pipeline(**arguments).images
            pixels, finite, ready = _to_host(images)
    except _EveryJobStopped:
        return _Launched([stopped[i] for i in range(len(jobs))])
    except torch.OutOfMemoryError as exc:
        torch.cuda.empty_cache()
        images_asked = sum(job.request.num_images for job in jobs)
        raise OutOfMemory(f"GPU out of memory for a batch of {images_asked} images") from exc
    plugin_sampler = "" if halves is None else request.sampler
    ran = _Ran(schedule_ran, wrappers_ran, reference, fallback, plugin_sampler)
    summary = _stack_summary(model, ran)
    return _Launched(
        model=model,
        jobs=jobs,
        pixels=pixels,
        finite=finite,
        ready=ready,
        stopped=stopped,
        summary=summary,
        reference=reference,
        started=started,
        encoded=encoded,
        swap_s=swap_s,
    )


def _to_host(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """The pipeline's [0, 1] NCHW images as 8-bit NHWC pixels (rounded as diffusers' ``numpy_to_pil``
    rounds) and a per-image finiteness flag, copied to pinned host memory without waiting; and the
    CUDA event that marks the copy done (None on a CPU)."""
    finite = torch.isfinite(images).flatten(1).all(1)
    pixels = (images.permute(0, 2, 3, 1).float() * 255).round().clamp(0, 255).to(torch.uint8)
    if images.device.type != "cuda":
        return pixels, finite, None
    host_pixels = torch.empty(pixels.shape, dtype=torch.uint8, pin_memory=True)
    host_finite = torch.empty(finite.shape, dtype=torch.bool, pin_memory=True)
    host_pixels.copy_(pixels, non_blocking=True)
    host_finite.copy_(finite, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record()
    return host_pixels, host_finite, ready


def _encode(model: LoadedModel, jobs: Sequence[GenerationJob], reference: bool) -> dict[str, torch.Tensor]:
    encoder = model.stack.encoder
    assert encoder is not None
    per_image = []
    for job in jobs:
        request = job.request
        guided = (request.guidance or 0) > 1 or request.sampler in model.stack.samplers
        spec = PromptSpec(request.prompt, request.negative_prompt, guided)
        if reference:
            with torch.no_grad():
                embedding = model.adapter.encode(model.pipeline, spec)
        else:
            embedding = encoder(spec)
        per_image.extend([embedding] * request.num_images)
    return batch_embeddings(per_image)


def _sampler_for(
    model: LoadedModel, request: GenerationRequest
) -> tuple[Sampler, Any, GuidanceHalves | None]:
    """The request's sampler, a fresh scheduler for it and, for a plugin's sampler, the holder of
    the guidance halves its step reads (the pipeline's combined prediction cannot give them)."""
    offer = model.stack.samplers.get(request.sampler)
    if offer is None:
        sampler = SAMPLERS[request.sampler]
        return sampler, sampler.build(model.scheduler_config), None
    halves = GuidanceHalves()
    scheduler = plugin_scheduler(model.scheduler_config)
    scheduler.run_plugin(offer, float(request.guidance or 0.0), halves)
    return PLUGIN_SAMPLER_BASE, scheduler, halves


def _pipeline_for(model: LoadedModel, img2img: bool, inpaint: bool) -> Pipeline:
    """The text-to-image pipeline, or its image-to-image or inpainting sibling on the same modules
    (the inpainting pipelines also take a model's plain denoiser: they blend the kept latents in)."""
    if not img2img:
        return model.pipeline
    # slow to import; only image input needs them
    from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting

    auto = AutoPipelineForInpainting if inpaint else AutoPipelineForImage2Image
    pipeline = auto.from_pipe(model.pipeline)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _schedule_arguments(
    model: LoadedModel, schedule: str, steps: int, scheduler: Any, sampler: Sampler
) -> tuple[dict[str, Any], str]:
    """``sigmas=`` for a custom schedule (flow-matching schedulers append their own final 0), and the
    name of the schedule that really runs (the scheduler's own when the plugin fails)."""
    offer = model.stack.schedules.get(schedule)
    sigmas = None
    if offer is not None:
        try:
            sigmas = offer.build(steps, scheduler)
        except Exception as exc:  # a plugin failing at run time falls back, never fails the request
            log.warning("schedule failed; using the scheduler's own", schedule=schedule, error=str(exc))
            schedule = REFERENCE_SCHEDULE
    if sigmas is None:
        return {"num_inference_steps": steps}, schedule
    if sampler.flow_matching:
        sigmas = sigmas[:-1]
    return {"sigmas": list(sigmas)}, schedule


def _guidance(jobs: Sequence[GenerationJob]) -> float | None:
    """The call's guidance scale: one number when every image has the same, else per image."""
    scales = [job.request.guidance for job in jobs for _ in range(job.request.num_images)]
    if len(set(scales)) == 1:
        return scales[0]
    return PerImageGuidance([float(scale or 0) for scale in scales])


class PerImageGuidance(float):
    """A classifier-free guidance scale per image, for one pipeline call.

    diffusers' pipelines compute ``uncond + guidance_scale * (text - uncond)`` and test
    ``guidance_scale > 1`` to decide whether guidance runs. As a number this is the smallest scale
    (the batch key keeps images that run guidance apart from those that do not, so the test answers
    for all); multiplied by a tensor of predictions (one row per image) it scales each row by its own
    image's scale. The per-row scales are copied to the device once per device and dtype: a fresh
    host-to-device copy every step would wait for the stream and stall the kernels queued ahead.
    """

    scales: tuple[float, ...]
    _on_device: dict[tuple[torch.device, torch.dtype], torch.Tensor]

    def __new__(cls, scales: Sequence[float]) -> PerImageGuidance:
        made = super().__new__(cls, min(scales))
        made.scales = tuple(scales)
        made._on_device = {}
        return made

    def __mul__(self, other: Any) -> Any:
        if not isinstance(other, torch.Tensor):
            return float(self) * other
        if other.shape[0] != len(self.scales):
            raise ValueError(f"{len(self.scales)} guidance scales for a batch of {other.shape[0]}")
        key = (other.device, other.dtype)
        if key not in self._on_device:
            host = torch.tensor(self.scales, dtype=other.dtype)
            host = host.pin_memory() if other.is_cuda else host
            self._on_device[key] = host.to(other.device, non_blocking=True)
        return other * self._on_device[key].view(-1, *([1] * (other.dim() - 1)))

    __rmul__ = __mul__


def _image_arguments(jobs: Sequence[GenerationJob]) -> dict[str, Any]:
    first = jobs[0].request
    if first.init_image is None:
        return {}
    images = [job.request.init_image for job in jobs for _ in range(job.request.num_images)]
    arguments = {"image": images, "strength": first.strength}
    if first.mask is not None:
        arguments["mask_image"] = [job.request.mask for job in jobs for _ in range(job.request.num_images)]
    return arguments


@contextlib.contextmanager
def _denoiser_stack(
    model: LoadedModel, pipeline: Pipeline, wrappers: Any, reference: bool, halves: GuidanceHalves | None
) -> Iterator[tuple[str, ...]]:
    """The compiled denoiser (the eager one where a wrapper needs it) with this request's wrappers
    attached and reset (or, for the reference stack, the eager one with SDPA attention), and
    ``halves`` kept from its calls for a plugin's sampler. Yields the wrappers that applied: one
    that fails to apply is logged and left out, never fatal."""
    offers = sorted((model.stack.wrappers[name] for name in wrappers), key=lambda o: -o.priority)
    denoiser = model.denoiser_for(with_wrappers=reference or _needs_eager(offers))
    model.adapter.set_denoiser(pipeline, denoiser)
    handles: list[DenoiserWrapper] = []
    applied: list[str] = []
    try:
        for offer in offers:
            options = {**model.info.plugin_options(offer.name), **wrappers[offer.name]}
            try:
                handle = offer.apply(denoiser, options)
                handle.reset_state()
            except Exception as exc:
                log.warning(
                    "denoiser wrapper failed to apply; running without it", wrapper=offer.name, error=str(exc)
                )
                continue
            handles.append(handle)
            applied.append(offer.name)
        with (
            _reference_attention(model, denoiser) if reference else contextlib.nullcontext(),
            halves.kept_from(denoiser) if halves is not None else contextlib.nullcontext(),
            _compiled_decode(model, pipeline) if not reference else contextlib.nullcontext(),
        ):
            yield tuple(applied)
    finally:
        for handle in reversed(handles):
            handle.remove()
        model.adapter.set_denoiser(pipeline, model.denoiser_for(with_wrappers=False))


def _compiled_decode(model: LoadedModel, pipeline: Pipeline) -> contextlib.AbstractContextManager[None]:
    """The pipeline's ``vae.decode`` through the ``compile_vae`` slot's module, when it chose one."""
    decode = model.stack.vae_decode
    if decode is None:
        return contextlib.nullcontext()
    return routed_decode(pipeline.vae, decode)


@contextlib.contextmanager
def _reference_attention(model: LoadedModel, denoiser: torch.nn.Module) -> Iterator[None]:
    """SDPA everywhere for the duration: the host's own processor (it understands fused projections)
    on UNets, diffusers' native dispatch on transformers; the chosen kernels are restored after."""
    if model.stack.attention_backend is not None:
        denoiser.set_attention_backend("native")  # type: ignore[operator]
        try:
            yield
        finally:
            denoiser.set_attention_backend(model.stack.attention_backend)  # type: ignore[operator]
        return
    if not model.stack.attention_plan:
        yield
        return
    chosen = dict(denoiser.attn_processors)  # type: ignore[arg-type]
    denoiser.set_attn_processor(KernelAttnProcessor(sdpa, "sdpa"))  # type: ignore[operator]
    try:
        yield
    finally:
        denoiser.set_attn_processor(chosen)  # type: ignore[operator]


def _needs_eager(offers: Sequence[DenoiserWrapperOffer]) -> bool:
    return not all(offer.on_compiled for offer in offers)


def _step_callback(
    model: LoadedModel, jobs: Sequence[GenerationJob], stopped: dict[int, DiffstackError]
) -> Any:
    offsets = _image_offsets(jobs)

    def on_step_end(pipeline: Pipeline, step: int, _timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        for index, job in enumerate(jobs):
            if index in stopped:
                continue
            reason = job.should_stop()
            if reason is not None:
                stopped[index] = reason
            elif job.on_step is not None:
                start, count = offsets[index]
                latents = tensors["latents"][start : start + count]
                job.on_step(
                    StepEvent(step + 1, pipeline.num_timesteps, _previewer(model, pipeline, latents, job))
                )
        if len(stopped) == len(jobs):
            raise _EveryJobStopped
        return {}

    return on_step_end


def _image_offsets(jobs: Sequence[GenerationJob]) -> list[tuple[int, int]]:
    offsets, start = [], 0
    for job in jobs:
        offsets.append((start, job.request.num_images))
        start += job.request.num_images
    return offsets


def _previewer(model: LoadedModel, pipeline: Pipeline, latents: torch.Tensor, job: GenerationJob) -> Any:
    latents = latents.detach().clone()

    def preview(max_side: int) -> list[Image.Image]:
        request = job.request
        return latent_previews(pipeline, latents, request.width, request.height, max_side)

    return preview


def _split(
    model: LoadedModel,
    jobs: Sequence[GenerationJob],
    pixels: np.ndarray,
    finite: np.ndarray,
    stopped: dict[int, DiffstackError],
    timings: dict[str, float],
    summary: dict[str, tuple[str, ...]],
    reference: bool,
) -> list[Outcome | None]:
    """Per job: its error, its result, or None when one of its images is not finite."""
    outcomes: list[Outcome | None] = []
    for index, (job, (start, count)) in enumerate(zip(jobs, _image_offsets(jobs), strict=True)):
        if index in stopped:
            outcomes.append(stopped[index])
            continue
        if not finite[start : start + count].all():
            log.warning("non-finite image", model=model.name, seeds=job.request.seeds, reference=reference)
            outcomes.append(None)
            continue
        generated = tuple(
            GeneratedImage(Image.fromarray(pixels[start + i]), job.request.seeds[i]) for i in range(count)
        )
        outcomes.append(GenerationResult(generated, model.name, summary, timings))
    return outcomes


def _stack_summary(model: LoadedModel, ran: _Ran) -> dict[str, tuple[str, ...]]:
    """The report's choices, narrowed to what this call really ran (run-time fallbacks included)."""
    summary = dict(model.report.summary())
    if ran.reference:
        summary.update(
            select_attention=("sdpa",),
            encode_prompt=(),
            compile_model=(),
            fallback=(f"reference stack: {ran.fallback}",),
        )
        if "compile_vae" in summary:
            summary["compile_vae"] = ()
    else:
        summary["select_attention"] = attention_in_use(model, summary.get("select_attention", ()))
        if _needs_eager([model.stack.wrappers[name] for name in ran.wrappers]):
            summary["compile_model"] = ()
    summary["build_sigmas"] = (ran.schedule,) if ran.schedule else ()
    summary["select_sampler"] = (ran.plugin_sampler,) if ran.plugin_sampler else ()
    summary["wrap_denoiser"] = ran.wrappers
    return summary


def attention_in_use(model: LoadedModel, chosen: tuple[str, ...]) -> tuple[str, ...]:
    """The attention entries as the last call ran them: where a chosen kernel raised or did not serve
    the call's shape, the kernel its fallback chain ran instead, and why (``scope: sparge (sage failed
    at run time)``)."""
    denoiser = model.denoiser_for(with_wrappers=True)
    processors = getattr(denoiser, "attn_processors", None)
    if not processors:
        return chosen
    by_label: dict[str, list[tuple[str, str] | None]] = {}
    for processor in processors.values():
        if isinstance(processor, KernelAttnProcessor):
            by_label.setdefault(processor.label, []).append(_ran_instead(processor))
    entries = []
    for entry in chosen:
        ran = [r for r in by_label.get(entry, []) if r is not None]
        if not ran:
            entries.append(entry)
            continue
        modules = len(by_label[entry])
        where = "" if len(ran) == modules else f" in {len(ran)} of {modules} modules"
        kernel, why = ran[0]
        entries.append(f"{entry.rpartition(': ')[0]}: {kernel}{where} ({why})")
    return tuple(entries)


def _ran_instead(processor: KernelAttnProcessor) -> tuple[str, str] | None:
    """What a processor's last call ran instead of its chosen kernel, and why; None when it ran that."""
    chain = processor.kernel
    if isinstance(chain, KernelChain):
        return (chain.used, "; ".join(chain.passed_over)) if chain.passed_over else None
    if processor.failed:
        return "sdpa", f"{processor.label.rpartition(': ')[2]} failed at run time"
    return None
