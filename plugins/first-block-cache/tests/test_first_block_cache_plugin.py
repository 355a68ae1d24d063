"""First-block cache through pluggy, on a real tiny FLUX transformer and inside a tiny FluxPipeline."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext

import pluggy
import pytest
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

import diffstack.hookspecs
import diffstack_first_block_cache
from diffstack.types import DenoiserKind, DenoiserWrapper, DenoiserWrapperOffer, Family, ModelInfo

SEQ, TEXT = 16, 5
# The head block runs every call; the others only when the head's residual moved past the threshold.
PROBES = ["transformer_blocks.0.attn", "transformer_blocks.1.attn", "single_transformer_blocks.1.attn"]


def model_info(family: Family, kind: DenoiserKind) -> ModelInfo:
    return ModelInfo(name="tiny", family=family, denoiser_kind=kind, device="cpu", dtype=torch.float32)


def offer_for(model: ModelInfo) -> DenoiserWrapperOffer:
    pm = pluggy.PluginManager("diffstack")
    pm.add_hookspecs(diffstack.hookspecs)
    pm.register(diffstack_first_block_cache)
    ((offer,),) = pm.hook.wrap_denoiser(model=model)
    return offer


OFFER = offer_for(model_info(Family.FLUX, DenoiserKind.TRANSFORMER))


@pytest.fixture(scope="module")
def transformer(tiny_transformer: Callable[[], FluxTransformer2DModel]) -> FluxTransformer2DModel:
    return tiny_transformer()


@torch.no_grad()
def denoise(
    transformer: FluxTransformer2DModel, steps: int, context: str | None = "cond"
) -> list[torch.Tensor]:
    """Calls as FluxPipeline makes them: one per step, inside the "cond" cache context by default."""
    g = torch.Generator().manual_seed(0)
    text, pooled = torch.randn(1, TEXT, 32, generator=g), torch.randn(1, 32, generator=g)
    outputs = []
    for step in range(steps):
        latents = torch.randn(1, SEQ, 16, generator=g)
        with transformer.cache_context(context) if context else nullcontext():
            outputs.append(
                transformer(
                    hidden_states=latents,
                    encoder_hidden_states=text,
                    pooled_projections=pooled,
                    timestep=torch.tensor([1.0 - step / steps]),
                    img_ids=torch.zeros(SEQ, 3),
                    txt_ids=torch.zeros(TEXT, 3),
                    return_dict=False,
                )[0]
            )
    return outputs


@contextmanager
def counting(module: torch.nn.Module) -> Iterator[Counter[str]]:
    calls: Counter[str] = Counter()
    modules = dict(module.named_modules())
    handles = [
        modules[name].register_forward_hook(lambda *_, name=name: calls.update([name])) for name in PROBES
    ]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def attached(transformer: torch.nn.Module, **options: float) -> Iterator[DenoiserWrapper]:
    handle = OFFER.apply(transformer, options)
    try:
        yield handle
    finally:
        handle.remove()


def test_offered_for_transformers_only() -> None:
    assert OFFER.name == "first_block_cache"
    assert OFFER.denoiser_kinds == {DenoiserKind.TRANSFORMER}
    assert OFFER.probe(model_info(Family.FLUX, DenoiserKind.TRANSFORMER)).ok
    answer = OFFER.probe(model_info(Family.SDXL, DenoiserKind.UNET))
    assert not answer.ok
    assert answer.reason == (
        "first-block cache needs a transformer denoiser; this model (sdxl) has a unet, on which "
        "diffusers' hook fails: use deepcache"
    )


def test_threshold_zero_is_exactly_no_cache(transformer: FluxTransformer2DModel) -> None:
    reference = denoise(transformer, 4)
    with attached(transformer, threshold=0.0):
        outputs = denoise(transformer, 4)
    assert all(torch.equal(a, b) for a, b in zip(outputs, reference, strict=True))


def test_a_large_threshold_skips_every_block_after_the_first(transformer: FluxTransformer2DModel) -> None:
    reference = denoise(transformer, 4)
    with attached(transformer, threshold=1e6), counting(transformer) as calls:
        outputs = denoise(transformer, 4)
    assert calls == {
        "transformer_blocks.0.attn": 4,
        "transformer_blocks.1.attn": 1,
        "single_transformer_blocks.1.attn": 1,
    }
    assert torch.equal(outputs[0], reference[0])
    assert not torch.equal(outputs[1], reference[1])


def test_the_default_threshold_is_paraattentions(transformer: FluxTransformer2DModel) -> None:
    with attached(transformer):
        head_hooks = transformer.transformer_blocks[0]._diffusers_hook.hooks.values()
        assert [hook.threshold for hook in head_hooks if hasattr(hook, "threshold")] == [0.08]


def test_reset_state_makes_the_next_call_run_every_block(transformer: FluxTransformer2DModel) -> None:
    with attached(transformer, threshold=1e6) as handle:
        denoise(transformer, 2)
        handle.reset_state()
        with counting(transformer) as calls:
            denoise(transformer, 2)
    assert calls["single_transformer_blocks.1.attn"] == 1


def test_remove_restores_the_transformer_exactly(transformer: FluxTransformer2DModel) -> None:
    reference = denoise(transformer, 2)
    with attached(transformer, threshold=1e6):
        denoise(transformer, 2)
    assert not transformer.is_cache_enabled
    assert all(torch.equal(a, b) for a, b in zip(denoise(transformer, 2), reference, strict=True))


def test_calls_outside_a_cache_context_get_a_default_one(transformer: FluxTransformer2DModel) -> None:
    # The host's checks and benchmarks call the transformer directly, not through a pipeline.
    reference = denoise(transformer, 3, context=None)
    with attached(transformer, threshold=0.0):
        assert all(
            torch.equal(a, b) for a, b in zip(denoise(transformer, 3, context=None), reference, strict=True)
        )
    with attached(transformer, threshold=1e6), counting(transformer) as calls:
        denoise(transformer, 3, context=None)
    assert calls["single_transformer_blocks.1.attn"] == 1
    assert transformer._diffusers_hook.get_hook("diffstack_first_block_cache_default_context") is None


def test_applies_to_a_transformer_that_already_ran_in_a_cache_context(
    transformer: FluxTransformer2DModel,
) -> None:
    # Every pipeline call runs the transformer inside cache_context, which caches the list of
    # hooked children; the cache must still reach blocks hooked afterwards.
    denoise(transformer, 1)
    with attached(transformer, threshold=1e6), counting(transformer) as calls:
        denoise(transformer, 3)
    assert calls["single_transformer_blocks.1.attn"] == 1


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"threshold": -0.1}, "threshold: Input should be greater than or equal to 0, got -0.1"),
        ({"threshold": "high"}, "threshold: Input should be a valid number, got 'high'"),
        ({"treshold": 0.1}, "treshold: unknown option; known: threshold"),
    ],
)
def test_bad_options_say_what_is_wrong(
    transformer: FluxTransformer2DModel, options: dict, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        OFFER.apply(transformer, options)
    assert not transformer.is_cache_enabled


def test_inside_a_flux_pipeline(transformer: FluxTransformer2DModel) -> None:
    vae = AutoencoderKL(
        block_out_channels=(32,),
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        latent_channels=4,
    )
    # Embeddings arrive through prompt_embeds=, as the engine passes them: no text encoders needed.
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)

    def generate() -> torch.Tensor:
        g = torch.Generator().manual_seed(3)
        return pipe(
            prompt_embeds=torch.randn(1, TEXT, 32, generator=g),
            pooled_prompt_embeds=torch.randn(1, 32, generator=g),
            num_inference_steps=4,
            height=16,
            width=16,
            output_type="latent",
            generator=g,
        ).images

    reference = generate()
    with attached(transformer, threshold=0.0) as handle:
        handle.reset_state()
        assert torch.equal(generate(), reference)
    with attached(transformer, threshold=1e6) as handle, counting(transformer) as calls:
        for _ in range(2):
            handle.reset_state()
            generate()
    assert calls["single_transformer_blocks.1.attn"] == 2  # the first step of each generation
