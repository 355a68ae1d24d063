"""The hook through pluggy, and the cache's contract: keys, isolation, failures, bounds, threads."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import pluggy
import pytest
import torch

import diffstack.hookspecs
import diffstack_prompt_cache
from diffstack.types import DenoiserKind, EncoderOffer, Family, ModelInfo, PromptSpec
from diffstack_prompt_cache.cache import CachingPromptEncoder

# One entry of the fake encoder: two float32 tensors of 8 values each.
ENTRY_BYTES = 2 * 8 * 4


def model_info(
    digest: str = "sha256:abc", options: Mapping[str, Mapping[str, Any]] | None = None
) -> ModelInfo:
    return ModelInfo(
        name="tiny-sd",
        family=Family.SD1,
        denoiser_kind=DenoiserKind.UNET,
        device="cpu",
        dtype=torch.float32,
        text_encoder_digest=digest,
        options=options or {},
    )


def offer_for(model: ModelInfo) -> EncoderOffer:
    pm = pluggy.PluginManager("diffstack")
    pm.add_hookspecs(diffstack.hookspecs)
    pm.register(diffstack_prompt_cache)
    ((offer,),) = pm.hook.encode_prompt(model=model)
    return offer


class FakeEncoder:
    """Deterministic embeddings derived from the spec; counts calls; can be told to fail."""

    def __init__(self) -> None:
        self.calls = 0
        self.fail = False

    def __call__(self, spec: PromptSpec) -> dict[str, torch.Tensor]:
        self.calls += 1
        if self.fail:
            raise RuntimeError("text encoder out of memory")
        seed = hash((spec.prompt, spec.negative_prompt, spec.classifier_free_guidance, spec.clip_skip))
        g = torch.Generator().manual_seed(seed % 2**31)
        return {"prompt_embeds": torch.randn(1, 8, generator=g), "negative_prompt_embeds": torch.randn(1, 8)}


def cached(inner: FakeEncoder, **options: Any) -> CachingPromptEncoder:
    model = model_info(options={"prompt_cache": options} if options else None)
    encoder = offer_for(model).wrap(inner, model)
    assert isinstance(encoder, CachingPromptEncoder)
    return encoder


def test_offer_is_outermost_and_probes_for_the_digest() -> None:
    offer = offer_for(model_info())
    assert offer.name == "prompt_cache"
    assert offer.priority >= 1000
    assert offer.probe(model_info()).ok
    answer = offer.probe(model_info(digest=""))
    assert not answer.ok
    assert answer.reason == (
        "the engine gave no text-encoder digest for this model, so cached embeddings could outlive "
        "a change of text encoder"
    )


def test_a_hit_skips_the_encoder_and_returns_the_same_embeddings() -> None:
    inner = FakeEncoder()
    encode = cached(inner)
    first = encode(PromptSpec("a cat"))
    second = encode(PromptSpec("a cat"))
    assert inner.calls == 1
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert encode.stats() == {
        "prompt_cache_hits": 1.0, "prompt_cache_misses": 1.0, "prompt_cache_evictions": 0.0,
        "prompt_cache_entries": 1.0, "prompt_cache_bytes": float(ENTRY_BYTES), "prompt_cache_refused": 0.0,
        "prompt_cache_max_bytes": float(256 * 2**20),
    }  # fmt: skip


@pytest.mark.parametrize(
    "other",
    [
        PromptSpec("a dog"),
        PromptSpec("a cat", negative_prompt="blurry"),
        PromptSpec("a cat", classifier_free_guidance=False),
        PromptSpec("a cat", clip_skip=2),
    ],
)
def test_every_field_of_the_spec_is_in_the_key(other: PromptSpec) -> None:
    inner = FakeEncoder()
    encode = cached(inner)
    encode(PromptSpec("a cat"))
    encode(other)
    assert inner.calls == 2


def test_callers_cannot_corrupt_the_cache() -> None:
    encode = cached(FakeEncoder())
    missed = encode(PromptSpec("a cat"))
    expected = missed["prompt_embeds"].clone()
    missed["prompt_embeds"].zero_()  # the tensor handed out on the miss
    hit = encode(PromptSpec("a cat"))
    assert torch.equal(hit["prompt_embeds"], expected)
    hit["prompt_embeds"].add_(1.0)  # the tensor handed out on a hit
    hit["negative_prompt_embeds"] = torch.zeros(1, 8)  # the mapping handed out on a hit
    again = encode(PromptSpec("a cat"))
    assert torch.equal(again["prompt_embeds"], expected)
    assert not torch.equal(again["negative_prompt_embeds"], torch.zeros(1, 8))


def test_a_failed_encoding_raises_and_is_not_cached() -> None:
    inner = FakeEncoder()
    encode = cached(inner)
    inner.fail = True
    with pytest.raises(RuntimeError, match="out of memory"):
        encode(PromptSpec("a cat"))
    assert encode.stats()["prompt_cache_entries"] == 0.0
    inner.fail = False
    encode(PromptSpec("a cat"))
    assert inner.calls == 2


def test_least_recently_used_is_evicted_when_over_max_bytes() -> None:
    inner = FakeEncoder()
    encode = cached(inner, max_bytes=2 * ENTRY_BYTES)
    encode(PromptSpec("a"))
    encode(PromptSpec("b"))
    encode(PromptSpec("a"))  # now "b" is the least recently used
    encode(PromptSpec("c"))  # evicts "b"
    stats = encode.stats()
    assert stats["prompt_cache_evictions"] == 1.0
    assert stats["prompt_cache_entries"] == 2.0
    assert stats["prompt_cache_bytes"] == 2 * ENTRY_BYTES
    calls = inner.calls
    encode(PromptSpec("a"))
    encode(PromptSpec("c"))
    assert inner.calls == calls
    encode(PromptSpec("b"))
    assert inner.calls == calls + 1


def test_an_entry_larger_than_the_bound_is_returned_but_not_stored() -> None:
    inner = FakeEncoder()
    encode = cached(inner, max_bytes=ENTRY_BYTES - 1)
    assert "prompt_embeds" in encode(PromptSpec("a cat"))
    encode(PromptSpec("a cat"))
    assert inner.calls == 2
    assert encode.stats()["prompt_cache_entries"] == 0.0
    assert encode.stats()["prompt_cache_evictions"] == 0.0


def test_negative_max_bytes_is_refused() -> None:
    with pytest.raises(ValueError, match="max_bytes"):
        cached(FakeEncoder(), max_bytes=-1)


def test_concurrent_use_keeps_the_books_straight() -> None:
    inner = FakeEncoder()
    encode = cached(inner, max_bytes=3 * ENTRY_BYTES)
    reference = {p: FakeEncoder()(PromptSpec(p)) for p in "abcde"}
    errors: list[BaseException] = []

    def worker(offset: int) -> None:
        try:
            for i in range(200):
                prompt = "abcde"[(i + offset) % 5]
                got = encode(PromptSpec(prompt))
                assert torch.equal(got["prompt_embeds"], reference[prompt]["prompt_embeds"])
                got["prompt_embeds"].mul_(-1)  # scribble on every result
        except BaseException as error:  # reported from the main thread below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    stats = encode.stats()
    assert stats["prompt_cache_hits"] + stats["prompt_cache_misses"] == 8 * 200
    assert stats["prompt_cache_misses"] == inner.calls
    assert stats["prompt_cache_entries"] <= 3
    assert stats["prompt_cache_bytes"] == stats["prompt_cache_entries"] * ENTRY_BYTES


class ScriptedEncoder:
    """Returns the embeddings it is given, in order; counts calls."""

    def __init__(self, *results: dict[str, torch.Tensor]) -> None:
        self.results = list(results)
        self.calls = 0

    def __call__(self, spec: PromptSpec) -> dict[str, torch.Tensor]:
        self.calls += 1
        return self.results.pop(0)


@pytest.mark.parametrize(
    "broken",
    [
        {"prompt_embeds": torch.tensor([[1.0, float("nan")]])},
        {"prompt_embeds": torch.tensor([[1.0, float("inf")]])},
        {"prompt_embeds": torch.zeros(2, 2)},  # a batch of two where one was asked for
    ],
    ids=["nan", "inf", "batch-of-two"],
)
def test_broken_embeddings_are_returned_but_never_replayed(broken: dict[str, torch.Tensor]) -> None:
    good = {"prompt_embeds": torch.ones(1, 2)}
    inner = ScriptedEncoder(broken, good)
    encode = cached(inner)
    assert encode(PromptSpec("a cat"))["prompt_embeds"].shape == broken["prompt_embeds"].shape
    assert torch.equal(encode(PromptSpec("a cat"))["prompt_embeds"], good["prompt_embeds"])
    assert torch.equal(encode(PromptSpec("a cat"))["prompt_embeds"], good["prompt_embeds"])  # a hit now
    assert inner.calls == 2
    assert encode.stats()["prompt_cache_refused"] == 1.0


def test_embeddings_shaped_unlike_the_earlier_ones_are_not_cached() -> None:
    """One model's encoder pads every prompt alike: a different shape is a broken encoding (a
    tokenizer whose truncation another thread switched off made 302-token embeddings)."""
    inner = ScriptedEncoder(
        {"prompt_embeds": torch.ones(1, 77, 4)},
        {"prompt_embeds": torch.ones(1, 302, 4)},
        {"prompt_embeds": torch.ones(1, 77, 4)},
    )
    encode = cached(inner)
    encode(PromptSpec("a"))
    encode(PromptSpec("b"))
    encode(PromptSpec("b"))
    assert inner.calls == 3
    assert encode.stats()["prompt_cache_entries"] == 2.0
    assert encode.stats()["prompt_cache_refused"] == 1.0


def test_bad_options_are_named_by_the_probe() -> None:
    model = model_info(options={"prompt_cache": {"max_bytes": "lots"}})
    assert offer_for(model).probe(model).reason == (
        "bad [plugins.options.prompt_cache]: max_bytes: Input should be a valid integer, got 'lots'"
    )
