"""The hook through pluggy, and DeepCache inside a real (tiny) StableDiffusionPipeline."""

from __future__ import annotations

import pluggy
import pytest
import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel

import diffstack.hookspecs
import diffstack_deepcache
from diffstack.types import DenoiserKind, DenoiserWrapperOffer, Family, ModelInfo


def model_info(family: Family, kind: DenoiserKind) -> ModelInfo:
    return ModelInfo(name="tiny", family=family, denoiser_kind=kind, device="cpu", dtype=torch.float32)


def offer_for(model: ModelInfo) -> DenoiserWrapperOffer:
    pm = pluggy.PluginManager("diffstack")
    pm.add_hookspecs(diffstack.hookspecs)
    pm.register(diffstack_deepcache)
    ((offer,),) = pm.hook.wrap_denoiser(model=model)
    return offer


@pytest.mark.parametrize("family", [Family.SD1, Family.SD2, Family.SDXL])
def test_offered_for_unets(family: Family) -> None:
    model = model_info(family, DenoiserKind.UNET)
    offer = offer_for(model)
    assert offer.name == "deepcache"
    assert offer.denoiser_kinds == {DenoiserKind.UNET}
    assert offer.probe(model).ok


def test_probe_says_why_not_for_transformers() -> None:
    model = model_info(Family.FLUX, DenoiserKind.TRANSFORMER)
    answer = offer_for(model).probe(model)
    assert not answer.ok
    assert answer.reason == (
        "DeepCache needs a UNet denoiser; this model (flux) has a transformer: use first_block_cache"
    )


@pytest.fixture(scope="module")
def pipe() -> StableDiffusionPipeline:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(32,),
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        latent_channels=4,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
    )
    # Embeddings arrive through prompt_embeds=, as the engine passes them: no text encoder needed.
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe: StableDiffusionPipeline) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return pipe(
        prompt_embeds=torch.randn(1, 7, 32, generator=g),
        negative_prompt_embeds=torch.randn(1, 7, 32, generator=g),
        num_inference_steps=6,
        height=8,
        width=8,
        output_type="latent",
        generator=g,
    ).images


@pytest.mark.slow
def test_in_a_pipeline_interval_one_is_exact_and_larger_intervals_skip(pipe: StableDiffusionPipeline) -> None:
    model = model_info(Family.SD1, DenoiserKind.UNET)
    offer = offer_for(model)
    reference = generate(pipe)

    handle = offer.apply(pipe.unet, {"interval": 1})
    handle.reset_state()
    exact = generate(pipe)
    handle.remove()
    assert torch.equal(exact, reference)

    mid_calls: list[int] = []
    counter = pipe.unet.mid_block.resnets[0].register_forward_hook(lambda *_: mid_calls.append(1))
    handle = offer.apply(pipe.unet, {"interval": 3, "branch": 0})
    try:
        for _ in range(2):  # two generations, each starting clean
            handle.reset_state()
            cached = generate(pipe)
    finally:
        handle.remove()
        counter.remove()
    assert len(mid_calls) == 4  # steps 0 and 3 of each generation
    assert torch.isfinite(cached).all()
    assert not torch.equal(cached, reference)
    assert torch.equal(generate(pipe), reference)
