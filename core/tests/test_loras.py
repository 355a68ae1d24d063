"""LoRAs per request on a tiny SD1 model: the hot-swapped slot gives what diffusers' own LoRA loading
gives, swaps back to the exact base model, never recompiles a compiled denoiser, and every bad
request is INVALID_ARGUMENT on its field."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline

from diffstack.engine import Engine, GenerationJob, GenerationRequest, GenerationResult, LoraSpec
from diffstack.engine.loras import LoraCatalogue, LoraSlot
from diffstack.errors import InvalidRequest
from diffstack.plugins import load_plugins
from diffstack.testing import baseline_settings, save_random_lora

PROMPT = "a red circle"


@pytest.fixture(scope="module")
def lora_dir(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models directory with the tiny SD1 model and LoRAs made for it (and one for SDXL)."""
    root = tmp_path_factory.mktemp("lora-models")
    shutil.copytree(models_dir / "tiny-sd1", root / "tiny-sd1")
    sd1 = DiffusionPipeline.from_pretrained(root / "tiny-sd1").unet
    sdxl = DiffusionPipeline.from_pretrained(models_dir / "tiny-sdxl").unet
    loras = root / "loras"
    save_random_lora(sd1, loras / "style-a.safetensors", rank=4, alpha=2, seed=1, std=0.5)
    save_random_lora(sd1, loras / "style-b.safetensors", rank=2, seed=2, std=0.5)
    save_random_lora(sd1, loras / "too-big.safetensors", rank=40, seed=3)
    save_random_lora(sdxl, loras / "for-sdxl.safetensors", rank=4, seed=4)
    (loras / "broken.safetensors").write_bytes(b"not a safetensors file")
    return root


@pytest.fixture(scope="module")
def lora_engine(lora_dir: Path) -> Engine:
    settings = baseline_settings(lora_dir, engine={"lora_rank": 8})
    return Engine.start(settings, load_plugins(settings.plugins))


def generate(engine: Engine, *loras: LoraSpec, seed: int = 3) -> np.ndarray:
    request = engine.prepare(GenerationRequest(PROMPT, steps=3, seeds=(seed,), loras=loras))
    (result,) = engine.run([GenerationJob(request)])
    assert isinstance(result, GenerationResult), result
    return np.asarray(result.images[0].image, dtype=np.int16)


def diffusers_reference(lora_dir: Path, adapters: dict[str, float], seed: int = 3) -> np.ndarray:
    """The same picture through plain diffusers and its own LoRA loading (no slot, no merging)."""
    pipe = DiffusionPipeline.from_pretrained(lora_dir / "tiny-sd1", use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    for name in adapters:
        pipe.load_lora_weights(str(lora_dir / "loras"), weight_name=f"{name}.safetensors", adapter_name=name)
    if adapters:
        pipe.set_adapters(list(adapters), adapter_weights=list(adapters.values()))
    image = pipe(
        PROMPT, num_inference_steps=3, height=64, width=64, generator=torch.Generator("cpu").manual_seed(seed)
    ).images[0]
    return np.asarray(image, dtype=np.int16)


def test_a_lora_gives_what_diffusers_own_loading_gives(lora_engine: Engine, lora_dir: Path) -> None:
    base = generate(lora_engine)
    styled = generate(lora_engine, LoraSpec("style-a", 0.8))
    assert np.abs(styled - base).max() > 10, "the LoRA must change the picture"
    assert np.abs(styled - diffusers_reference(lora_dir, {"style-a": 0.8})).max() <= 2
    both = generate(lora_engine, LoraSpec("style-b", -0.5), LoraSpec("style-a", 1.2))
    reference = diffusers_reference(lora_dir, {"style-a": 1.2, "style-b": -0.5})
    assert np.abs(both - reference).max() <= 2
    assert np.array_equal(generate(lora_engine), base), "no LoRA swaps the exact base model back"


def test_the_base_model_is_unchanged_by_its_zero_slot(lora_engine: Engine, lora_dir: Path) -> None:
    assert lora_engine.model().loras is not None
    assert np.array_equal(generate(lora_engine), diffusers_reference(lora_dir, {}))


def test_loras_are_part_of_the_batch_key_in_name_order(lora_engine: Engine) -> None:
    def key(*loras: LoraSpec) -> object:
        return lora_engine.batch_key(lora_engine.prepare(GenerationRequest(PROMPT, steps=3, loras=loras)))

    a, b = LoraSpec("style-a", 0.5), LoraSpec("style-b", 1.0)
    assert key(a, b) == key(b, a)
    assert key(a) != key() != key(LoraSpec("style-a", 0.6))


@pytest.mark.parametrize(
    ("loras", "field", "words"),
    [
        ((LoraSpec("../tiny-sd1"),), "loras[0].name", "must be one entry"),
        ((LoraSpec(".hidden"),), "loras[0].name", "must be one entry"),
        ((LoraSpec("nope"),), "loras[0].name", "unknown LoRA"),
        ((LoraSpec("style-a", float("nan")),), "loras[0].scale", "finite"),
        ((LoraSpec("style-a", 5.0),), "loras[0].scale", "within"),
        ((LoraSpec("style-a"), LoraSpec("style-a")), "loras[1].name", "twice"),
        ((LoraSpec("for-sdxl"),), "loras[0].name", "another base model"),
        ((LoraSpec("too-big"),), "loras[0].name", "above the slot's 6"),
        ((LoraSpec("broken"),), "loras[0].name", "not a readable safetensors"),
        ((LoraSpec("style-a"), LoraSpec("style-b"), LoraSpec("style-a", 2)), "loras[2].name", "twice"),
        (tuple(LoraSpec(f"l{i}") for i in range(5)), "loras", "at most 4"),
    ],
)
def test_bad_loras_are_refused_on_their_field(
    lora_engine: Engine, loras: tuple[LoraSpec, ...], field: str, words: str
) -> None:
    with pytest.raises(InvalidRequest) as caught:
        lora_engine.prepare(GenerationRequest(PROMPT, loras=loras))
    assert any(v.field == field and words in v.description for v in caught.value.violations), caught.value


def test_combined_rank_beyond_the_slot_is_refused(lora_dir: Path) -> None:
    settings = baseline_settings(lora_dir, engine={"lora_rank": 5})
    engine = Engine.start(settings, load_plugins(settings.plugins))
    with pytest.raises(InvalidRequest, match="together need rank 6"):
        engine.prepare(GenerationRequest(PROMPT, loras=(LoraSpec("style-a"), LoraSpec("style-b"))))


def test_listing_says_what_each_lora_is_and_which_models_take_it(lora_engine: Engine) -> None:
    listed = {lora.name: lora for lora in lora_engine.loras()}
    assert {"style-a", "style-b", "too-big", "for-sdxl", "broken", "colour-swap"} <= set(listed)
    style = listed["style-a"]
    assert (style.rank, style.base, style.compatible_models) == (4, "unet", ("tiny-sd1",))
    assert style.target_modules == ("to_k", "to_out.0", "to_q", "to_v")
    assert style.size_bytes > 0 and not style.problems
    assert listed["for-sdxl"].problems and not listed["for-sdxl"].compatible_models
    assert "safetensors" in listed["broken"].problems[0]
    assert all(m.name != "loras" for m in lora_engine.models()), "loras/ is no model"


def test_a_model_no_lora_fits_gets_no_slot(models_dir: Path) -> None:
    unet = DiffusionPipeline.from_pretrained(models_dir / "tiny-sd2").unet
    assert LoraSlot.prepare(unet, 8, LoraCatalogue([]), 2) is None
    assert LoraSlot.prepare(unet, 0, LoraCatalogue.for_models_dir(None), 2) is None


def test_a_swap_on_a_compiled_denoiser_does_not_recompile(lora_dir: Path) -> None:
    """Dynamo decides recompiles from its guards whatever the backend, so the cheap ``eager`` backend
    shows on a CPU what the GPU's inductor + CUDA graphs stack does on a swap."""
    unet = DiffusionPipeline.from_pretrained(lora_dir / "tiny-sd1").unet.eval()
    slot = LoraSlot(unet, 8, LoraCatalogue([lora_dir / "loras"]), cache=1)
    compiled = torch.compile(unet, backend="eager", fullgraph=True)
    inputs = {
        "sample": torch.randn(1, 4, 8, 8),
        "timestep": torch.tensor(10.0),
        "encoder_hidden_states": torch.randn(1, 77, unet.config.cross_attention_dim),
    }
    outputs = []
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        for loras in ((), (LoraSpec("style-a"),), (LoraSpec("style-b", 2.0),), (LoraSpec("style-a"),), ()):
            slot.activate(loras)
            outputs.append(compiled(**inputs).sample)
            assert torch.allclose(outputs[-1], unet(**inputs).sample, atol=1e-5), (
                "compiled runs the swapped LoRA"
            )
    assert not torch.equal(outputs[0], outputs[1]) and not torch.equal(outputs[1], outputs[2])
    assert torch.equal(outputs[0], outputs[4]) and torch.allclose(outputs[1], outputs[3])
    assert len(slot._cache) == 1, "the cache keeps at most its size"


def test_listing_keeps_no_weights_and_a_replaced_file_is_read_again(lora_dir: Path, tmp_path: Path) -> None:
    unet = DiffusionPipeline.from_pretrained(lora_dir / "tiny-sd1").unet.eval()
    path = save_random_lora(unet, tmp_path / "loras" / "mine.safetensors", rank=2, seed=5, std=0.5)
    catalogue = LoraCatalogue([tmp_path / "loras"])
    assert catalogue.read("mine").rank == 2 and not catalogue.read("mine").factors
    slot = LoraSlot(unet, 4, catalogue, cache=2)
    inputs = {
        "sample": torch.randn(1, 4, 8, 8),
        "timestep": torch.tensor(10.0),
        "encoder_hidden_states": torch.randn(1, 77, unet.config.cross_attention_dim),
    }
    with torch.no_grad():
        slot.activate((LoraSpec("mine"),))
        before = unet(**inputs).sample
        save_random_lora(unet, path, rank=2, seed=6, std=0.5)
        stat = path.stat()
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
        slot.activate(())
        slot.activate((LoraSpec("mine"),))
        after = unet(**inputs).sample
    assert not torch.allclose(before, after)


def test_an_eager_stack_switches_the_zero_adapter_off_between_lora_requests(lora_engine: Engine) -> None:
    model = lora_engine.model()
    assert model.loras is not None and model.loras.eager_only, "the baseline stack runs eager"

    def adapters_on() -> bool:
        return any(
            not layer.disable_adapters for layer in model.loras.denoiser.modules() if hasattr(layer, "lora_A")
        )

    base = generate(lora_engine)
    assert not adapters_on()
    styled = generate(lora_engine, LoraSpec("style-a"))
    assert adapters_on() and not np.array_equal(styled, base)
    assert np.array_equal(generate(lora_engine), base) and not adapters_on()
