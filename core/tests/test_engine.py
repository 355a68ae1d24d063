"""The engine end to end on tiny models: families, samplers, seeds, batching, img2img, cancel."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from PIL import Image

from diffstack.engine import Engine, GenerationJob, GenerationRequest, GenerationResult
from diffstack.engine.samplers import SAMPLERS
from diffstack.errors import Cancelled, InvalidRequest
from diffstack.plugins import load_plugins
from diffstack.testing import baseline_settings
from diffstack.types import Family


def generate(engine: Engine, **fields: object) -> GenerationResult:
    request = engine.prepare(GenerationRequest(**{"prompt": "a red circle", "steps": 3, **fields}))  # type: ignore[arg-type]
    (result,) = engine.run([GenerationJob(request)])
    assert isinstance(result, GenerationResult), result
    return result


def pixels(result: GenerationResult, index: int = 0) -> np.ndarray:
    return np.asarray(result.images[index].image, dtype=np.int16)


@pytest.mark.parametrize("family", list(Family))
def test_each_family_loads_from_disk_and_generates(engine: Engine, family: Family) -> None:
    result = generate(engine, model=f"tiny-{family.value}", seeds=(1,))
    model = engine.model(f"tiny-{family.value}")
    assert model.info.family is family
    assert result.images[0].image.size == (64, 64)
    assert result.images[0].seed == 1


def test_baseline_stack_equals_plain_diffusers(engine: Engine, models_dir: Path) -> None:
    result = generate(engine, seeds=(42,), negative_prompt="blurry", guidance=6.0)
    plain = DiffusionPipeline.from_pretrained(models_dir / "tiny-sd1", use_safetensors=True)
    plain.set_progress_bar_config(disable=True)
    expected = plain(
        "a red circle",
        negative_prompt="blurry",
        num_inference_steps=3,
        guidance_scale=6.0,
        height=64,
        width=64,
        generator=torch.Generator("cpu").manual_seed(42),
    ).images[0]
    assert np.array_equal(pixels(result), np.asarray(expected, dtype=np.int16))


def test_same_seed_same_image_and_different_seed_different_image(engine: Engine) -> None:
    first, again, other = (generate(engine, seeds=(s,)) for s in (7, 7, 8))
    assert np.array_equal(pixels(first), pixels(again))
    assert not np.array_equal(pixels(first), pixels(other))


def test_an_image_is_the_same_alone_or_in_a_batch(engine: Engine) -> None:
    """Per-image generators make the seed alone decide the picture. Tolerance: 1 level of 255, as
    CPU matrix kernels may block a batch of 6 differently from a batch of 2; on equal blocking it is 0."""
    alone = generate(engine, seeds=(11,))
    batch_requests = [
        engine.prepare(GenerationRequest("a red circle", steps=3, seeds=(s,))) for s in (10, 11, 12)
    ]
    results = engine.run([GenerationJob(r) for r in batch_requests])
    in_batch = results[1]
    assert isinstance(in_batch, GenerationResult)
    assert np.abs(pixels(alone) - pixels(in_batch)).max() <= 1


def test_a_launched_batch_is_collected_on_another_thread_as_run_gives_it(engine: Engine) -> None:
    """The serving split: launch on the device thread, collect elsewhere, same pictures as ``run``."""
    requests = [engine.prepare(GenerationRequest("a red circle", steps=3, seeds=(s,))) for s in (21, 22)]
    launched = engine.launch([GenerationJob(r) for r in requests])
    with ThreadPoolExecutor(1) as other:
        collected = launched.retry(other.submit(launched.collect).result())
    ran = engine.run([GenerationJob(r) for r in requests])
    for got, expected in zip(collected, ran, strict=True):
        assert isinstance(got, GenerationResult) and isinstance(expected, GenerationResult)
        assert got.images[0].seed == expected.images[0].seed
        assert np.array_equal(pixels(got), pixels(expected))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    """The shipped trained model: unlike the random tiny ones, its pictures follow the prompt, so
    guidance changes them (on a tiny model the text has no visible effect)."""
    root = Path(str(resources.files("diffstack")))
    settings = baseline_settings(root, default_model="default_model")
    return Engine.start(settings, load_plugins(settings.plugins))


def test_images_with_different_guidance_share_a_call_and_each_keeps_its_own(trained: Engine) -> None:
    """Per-image guidance: the same pictures as each request alone (1 level of 255, as above)."""
    requests = [
        trained.prepare(
            GenerationRequest("a small red circle", steps=3, seeds=(30 + i,), guidance=g, num_images=n)
        )
        for i, (g, n) in enumerate([(3.0, 1), (9.0, 2), (6.5, 1)])
    ]
    assert len({trained.batch_key(r) for r in requests}) == 1
    together = trained.run([GenerationJob(r) for r in requests])
    for request, batched in zip(requests, together, strict=True):
        (alone,) = trained.run([GenerationJob(request)])
        assert isinstance(alone, GenerationResult) and isinstance(batched, GenerationResult)
        for index in range(request.num_images):
            assert np.abs(pixels(alone, index) - pixels(batched, index)).max() <= 1
    (other_scale,) = trained.run([GenerationJob(replace(requests[0], guidance=9.0))])
    assert isinstance(other_scale, GenerationResult)
    assert np.abs(pixels(together[0]) - pixels(other_scale)).max() > 10  # guidance does show


def test_guidance_splits_a_batch_only_where_it_turns_guidance_on_or_off(engine: Engine) -> None:
    def key(model: str, guidance: float) -> object:
        request = GenerationRequest("a red circle", steps=3, seeds=(1,), guidance=guidance, model=model)
        return engine.batch_key(engine.prepare(request))

    assert key("", 5.0) == key("", 8.0)
    assert key("", 1.0) != key("", 5.0)  # 1 runs no classifier-free guidance: another computation
    assert key("tiny-flux", 3.5) != key("tiny-flux", 4.0)  # FLUX's guidance is a model input


def test_num_images_continues_seeds_from_the_last_given(engine: Engine) -> None:
    result = generate(engine, seeds=(5,), num_images=3)
    assert [image.seed for image in result.images] == [5, 6, 7]
    assert not np.array_equal(pixels(result, 0), pixels(result, 1))


@pytest.mark.parametrize("sampler", [s for s in SAMPLERS if s != "flow_euler"])
def test_every_unet_sampler_runs(engine: Engine, sampler: str) -> None:
    result = generate(engine, sampler=sampler, seeds=(1,))
    assert np.asarray(result.images[0].image).std() > 0


def test_flow_matching_sampler_serves_flux(engine: Engine) -> None:
    result = generate(engine, model="tiny-flux", sampler="flow_euler", guidance=3.5)
    assert result.images[0].image.size == (64, 64)


def test_img2img_starts_from_the_given_picture(engine: Engine) -> None:
    init = Image.new("RGB", (64, 64), (200, 30, 30))
    low, high = (generate(engine, init_image=init, strength=s, steps=10, seeds=(3,)) for s in (0.3, 1.0))
    red = np.asarray(init, dtype=np.int16)
    assert np.abs(pixels(low) - red).mean() < np.abs(pixels(high) - red).mean()


def test_karras_schedule_changes_the_picture(engine: Engine) -> None:
    default, karras = (generate(engine, schedule=s, seeds=(4,)) for s in ("default", "karras"))
    assert karras.stack["build_sigmas"] == ("karras",)
    assert not np.array_equal(pixels(default), pixels(karras))


def test_cancel_stops_at_the_next_step(engine: Engine) -> None:
    steps_seen: list[int] = []
    request = engine.prepare(GenerationRequest("a red circle", steps=10))
    job = GenerationJob(
        request,
        on_step=lambda event: steps_seen.append(event.step),
        should_stop=lambda: Cancelled("client went away") if len(steps_seen) >= 2 else None,
    )
    (result,) = engine.run([job])
    assert isinstance(result, Cancelled)
    assert steps_seen == [1, 2]


def test_a_cancelled_job_does_not_stop_its_batch_neighbour(engine: Engine) -> None:
    requests = [engine.prepare(GenerationRequest("a red circle", steps=3, seeds=(s,))) for s in (1, 2)]
    jobs = [GenerationJob(requests[0], should_stop=lambda: Cancelled("bye")), GenerationJob(requests[1])]
    cancelled, finished = engine.run(jobs)
    assert isinstance(cancelled, Cancelled)
    assert isinstance(finished, GenerationResult), finished
    assert [image.seed for image in finished.images] == [2]


def test_previews_decode_the_current_latents(engine: Engine) -> None:
    previews: list[Image.Image] = []
    request = engine.prepare(GenerationRequest("a red circle", steps=2))
    engine.run([GenerationJob(request, on_step=lambda event: previews.extend(event.preview(32)))])
    assert [p.size for p in previews] == [(32, 32), (32, 32)]


def test_prepared_request_keys_batches(engine: Engine) -> None:
    a = engine.prepare(GenerationRequest("a", seeds=(1,)))
    b = engine.prepare(GenerationRequest("b", seeds=(2,)))
    assert engine.batch_key(a) == engine.batch_key(b)
    assert engine.batch_key(a) != engine.batch_key(replace(b, steps=b.steps + 1))


def test_a_custom_schedule_reaches_a_flow_matching_sampler_without_its_final_zero(engine: Engine) -> None:
    """FlowMatch schedulers append the final 0 themselves; the engine drops the offer's own."""
    from diffstack.hookspecs import hookimpl
    from diffstack.plugins import PluginHost
    from diffstack.types import PluginRecord, SigmasOffer

    seen: list[int] = []

    def linear(steps: int, scheduler: object) -> list[float]:
        return [1 - i / steps for i in range(steps + 1)]

    class Plugin:
        @hookimpl
        def build_sigmas(self) -> list[SigmasOffer]:
            return [SigmasOffer(name="linear", build=linear)]

    host = PluginHost()
    host.register(Plugin(), PluginRecord("linear", "", "", "", (), "loaded"))
    flux = Engine(engine.settings, host)
    request = flux.prepare(GenerationRequest("a red circle", model="tiny-flux", steps=4, schedule="linear"))
    flux.run([GenerationJob(request, on_step=lambda event: seen.append(event.total))])
    assert seen == [4, 4, 4, 4]
    sigmas = flux.model("tiny-flux").pipeline.scheduler.sigmas
    assert len(sigmas) == 5 and float(sigmas[-1]) == 0.0


@pytest.mark.parametrize("family", [f for f in Family if f is not Family.FLUX])
def test_inpainting_repaints_only_the_white_part_of_the_mask(engine: Engine, family: Family) -> None:
    """Two seeds differ where the mask is white and agree where it is black (the UNet families' plain
    denoisers, through diffusers' inpainting pipelines, which blend the kept latents back each step)."""
    init = Image.new("RGB", (64, 64), (200, 30, 30))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))  # repaint the left half, keep the right
    a, b = (
        pixels(
            generate(
                engine, model=f"tiny-{family.value}", init_image=init, mask=mask, strength=1.0, seeds=(seed,)
            )
        )
        for seed in (1, 2)
    )
    repainted = np.abs(a[:, :24] - b[:, :24]).mean()
    kept = np.abs(a[:, 40:] - b[:, 40:]).mean()
    assert kept < repainted / 4


def test_a_mask_needs_an_init_image_of_its_size(engine: Engine) -> None:
    mask = Image.new("L", (64, 64), 255)
    with pytest.raises(InvalidRequest, match="needs an init_image"):
        engine.prepare(GenerationRequest("a", mask=mask))
    with pytest.raises(InvalidRequest, match="is 64x64 but init_image is 32x64"):
        engine.prepare(GenerationRequest("a", mask=mask, init_image=Image.new("RGB", (32, 64))))
