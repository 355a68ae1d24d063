"""The shipped synthetic-shapes-flux really draws what it is asked for, far above a random model.

Plain diffusers FluxPipeline on CPU (no engine, no plugins), the model's own defaults (20 flow-Euler
steps, no guidance), scored by the synthetic-world harness on prompts the model card does not report
on. A model of the identical configuration, freshly initialised from the shipped configs, goes through
the same scoring and must stay far below: the margin is what training bought.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import diffusers
import pytest
import torch
import transformers
from safetensors import safe_open

from diffstack.engine.loading import detect_family
from diffstack.synthetic.quality import QualityRow, evaluate, fixed_scenes, pipeline_generator
from diffstack.types import Family

MODEL = Path(str(resources.files("diffstack") / "models" / "synthetic-shapes-flux"))
SCENES = fixed_scenes(12, seed=3)  # not the prompt set the model card reports on
BAR = 0.9  # the target at 20 flow-Euler steps
MARGIN = 0.4  # over a random model of the same config (which reads back at about chance, ~0.3)


def _meta() -> dict[str, Any]:
    meta: dict[str, Any] = json.loads((MODEL / "diffstack.json").read_text())
    return meta


def _score(pipe: Any) -> QualityRow:
    pipe.set_progress_bar_config(disable=True)
    t5_length = pipe.tokenizer_2.model_max_length
    generate = pipeline_generator(pipe, batch_size=12, max_sequence_length=t5_length, height=64, width=64)
    config = {"steps": _meta()["default_steps"], "guidance": _meta()["default_guidance"]}
    (row,) = evaluate(generate, {"default": config}, scenes=SCENES, seeds=(0,), warmup=False)
    return row


def _random_pipeline() -> Any:
    """The shipped configs, freshly initialised; the shipped tokenizers and scheduler."""
    torch.manual_seed(0)
    return diffusers.FluxPipeline(
        vae=diffusers.AutoencoderKL.from_config(diffusers.AutoencoderKL.load_config(MODEL / "vae")),
        transformer=diffusers.FluxTransformer2DModel.from_config(
            diffusers.FluxTransformer2DModel.load_config(MODEL / "transformer")
        ),
        text_encoder=transformers.CLIPTextModel(
            transformers.CLIPTextConfig.from_pretrained(MODEL / "text_encoder")
        ),
        text_encoder_2=transformers.T5EncoderModel(
            transformers.T5Config.from_pretrained(MODEL / "text_encoder_2")
        ),
        tokenizer=transformers.CLIPTokenizer.from_pretrained(MODEL / "tokenizer"),
        tokenizer_2=transformers.CLIPTokenizer.from_pretrained(MODEL / "tokenizer_2"),
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(MODEL / "scheduler"),
    )


def test_shipped_model_metadata_and_layout() -> None:
    meta = _meta()
    assert (meta["name"], meta["weights"], meta["family"]) == ("synthetic-shapes-flux", "trained", "flux")
    assert (meta["default_width"], meta["default_height"], meta["default_steps"]) == (64, 64, 20)
    assert detect_family(MODEL) == Family.FLUX
    files = [p for p in MODEL.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".ckpt")]
    assert max(p.stat().st_size for p in files) < 15 * 2**20
    assert sum(p.stat().st_size for p in files) <= 40e6
    weights = [p for p in files if p.suffix == ".safetensors"]
    assert len(weights) == 4
    for path in weights:  # stored in half precision, as the exporter writes them
        with safe_open(str(path), "pt") as tensors:
            assert {str(tensors.get_slice(k).get_dtype()) for k in tensors.keys()} == {"F16"}, path  # noqa: SIM118 (not iterable)
    vae = json.loads((MODEL / "vae" / "config.json").read_text())
    assert vae["latent_channels"] == 16 and vae["shift_factor"] is not None


@pytest.mark.slow
def test_shipped_model_draws_the_prompt_far_above_a_random_one() -> None:
    trained = _score(diffusers.FluxPipeline.from_pretrained(str(MODEL), use_safetensors=True))
    random = _score(_random_pipeline())
    assert trained.overall >= BAR, trained
    assert trained.overall - random.overall >= MARGIN, (trained, random)
    assert random.exact < 0.2, random
