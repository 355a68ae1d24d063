"""One pipeline call for a batch of prepared jobs, with the composed stack applied.

Each image gets its own ``torch.Generator``, so an image with seed S is the same picture whether it
ran alone or inside a batch. Progress and cancellation go through ``callback_on_step_end``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from typing import Any

import structlog
import torch
from PIL import Image

from diffstack.engine.families import Pipeline, batch_embeddings
from diffstack.engine.model import LoadedModel
from diffstack.engine.requests import GeneratedImage, GenerationJob, GenerationResult, StepEvent
from diffstack.engine.samplers import SAMPLERS, Sampler
from diffstack.errors import DiffstackError, OutOfMemory
from diffstack.types import DenoiserWrapper, PromptSpec

log = structlog.get_logger(__name__)


class _EveryJobStopped(Exception):
    """Raised inside the pipeline's step callback to end the call early."""


def run_batch(model: LoadedModel, jobs: Sequence[GenerationJob]) -> list[GenerationResult | DiffstackError]:
    request = jobs[0].request
    stopped: dict[int, DiffstackError] = {}
    started = time.perf_counter()
    with model.lock:
        try:
            embeddings = _encode(model, jobs)
            encoded = time.perf_counter()
            pipeline = _pipeline_for(model, request.init_image is not None)
            sampler = SAMPLERS[request.sampler]
            scheduler = sampler.build(model.scheduler_config)
            pipeline.scheduler = scheduler
            arguments = {
                **embeddings,
                **_schedule_arguments(model, request.schedule, request.steps, scheduler, sampler),
                **_image_arguments(jobs),
                "height": request.height,
                "width": request.width,
                "guidance_scale": request.guidance,
                "generator": [
                    torch.Generator("cpu").manual_seed(s) for job in jobs for s in job.request.seeds
                ],
                "callback_on_step_end": _step_callback(model, jobs, stopped),
                "output_type": "pil",
            }
            with _denoiser_stack(model, pipeline, request.wrappers):
                images = pipeline(**arguments).images
        except _EveryJobStopped:
            return [stopped[i] for i in range(len(jobs))]
        except torch.OutOfMemoryError as exc:
            torch.cuda.empty_cache()
            images_asked = sum(job.request.num_images for job in jobs)
            raise OutOfMemory(f"GPU out of memory for a batch of {images_asked} images") from exc
    finished = time.perf_counter()
    timings = {"encode_s": encoded - started, "pipeline_s": finished - encoded, "total_s": finished - started}
    return _split(model, jobs, images, stopped, timings)


def _encode(model: LoadedModel, jobs: Sequence[GenerationJob]) -> dict[str, torch.Tensor]:
    encoder = model.stack.encoder
    assert encoder is not None
    per_image = []
    for job in jobs:
        request = job.request
        spec = PromptSpec(request.prompt, request.negative_prompt, (request.guidance or 0) > 1)
        embedding = encoder(spec)
        per_image.extend([embedding] * request.num_images)
    return batch_embeddings(per_image)


def _pipeline_for(model: LoadedModel, img2img: bool) -> Pipeline:
    if not img2img:
        return model.pipeline
    from diffusers import AutoPipelineForImage2Image  # slow to import; only img2img needs it

    pipeline = AutoPipelineForImage2Image.from_pipe(model.pipeline)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _schedule_arguments(
    model: LoadedModel, schedule: str, steps: int, scheduler: Any, sampler: Sampler
) -> dict[str, Any]:
    """``sigmas=`` for a custom schedule (flow-matching schedulers append their own final 0)."""
    offer = model.stack.schedules.get(schedule)
    sigmas = None
    if offer is not None:
        try:
            sigmas = offer.build(steps, scheduler)
        except Exception as exc:  # a plugin failing at run time falls back, never fails the request
            log.warning("schedule failed; using the scheduler's own", schedule=schedule, error=str(exc))
    if sigmas is None:
        return {"num_inference_steps": steps}
    if sampler.flow_matching:
        sigmas = sigmas[:-1]
    return {"sigmas": list(sigmas)}


def _image_arguments(jobs: Sequence[GenerationJob]) -> dict[str, Any]:
    first = jobs[0].request
    if first.init_image is None:
        return {}
    images = [job.request.init_image for job in jobs for _ in range(job.request.num_images)]
    return {"image": images, "strength": first.strength}


@contextlib.contextmanager
def _denoiser_stack(model: LoadedModel, pipeline: Pipeline, wrappers: Any) -> Iterator[None]:
    """The compiled denoiser, or the eager one with this request's wrappers attached and reset."""
    denoiser = model.denoiser_for(with_wrappers=bool(wrappers))
    model.adapter.set_denoiser(pipeline, denoiser)
    handles: list[DenoiserWrapper] = []
    try:
        offers = sorted((model.stack.wrappers[name] for name in wrappers), key=lambda o: -o.priority)
        for offer in offers:
            options = {**model.info.plugin_options(offer.name), **wrappers[offer.name]}
            handle = offer.apply(denoiser, options)
            handles.append(handle)
            handle.reset_state()
        yield
    finally:
        for handle in reversed(handles):
            handle.remove()
        model.adapter.set_denoiser(pipeline, model.denoiser_for(with_wrappers=False))


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
        images = decode_latents(model, pipeline, latents, job.request.width, job.request.height)
        for image in images:
            image.thumbnail((max_side, max_side))
        return images

    return preview


def decode_latents(
    model: LoadedModel, pipeline: Pipeline, latents: torch.Tensor, width: int, height: int
) -> list[Image.Image]:
    """Decode in-progress latents with the model's VAE (previews)."""
    vae = pipeline.vae
    with torch.inference_mode():
        if latents.ndim == 3:  # FLUX packs 2x2 latent patches into tokens
            latents = pipeline._unpack_latents(latents, height, width, pipeline.vae_scale_factor)
        latents = latents / vae.config.scaling_factor + (getattr(vae.config, "shift_factor", None) or 0.0)
        decoded = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
    return pipeline.image_processor.postprocess(decoded, output_type="pil")


def _split(
    model: LoadedModel,
    jobs: Sequence[GenerationJob],
    images: list[Image.Image],
    stopped: dict[int, DiffstackError],
    timings: dict[str, float],
) -> list[GenerationResult | DiffstackError]:
    results: list[GenerationResult | DiffstackError] = []
    summary = _stack_summary(model, jobs[0])
    for index, (job, (start, count)) in enumerate(zip(jobs, _image_offsets(jobs), strict=True)):
        if index in stopped:
            results.append(stopped[index])
            continue
        generated = tuple(GeneratedImage(images[start + i], job.request.seeds[i]) for i in range(count))
        results.append(GenerationResult(generated, model.name, summary, timings))
    return results


def _stack_summary(model: LoadedModel, job: GenerationJob) -> dict[str, tuple[str, ...]]:
    """The report's choices, narrowed to what this request used."""
    summary = dict(model.report.summary())
    summary["build_sigmas"] = (job.request.schedule,) if job.request.schedule else ()
    summary["wrap_denoiser"] = tuple(job.request.wrappers)
    if job.request.wrappers:
        summary["compile_model"] = ()
    return summary
