"""The UNet glue against diffusers itself: λ = 0 Euler CFG++ is the pipeline's unconditional Euler."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from diffstack_cfgpp.pipeline import generate


@pytest.fixture(scope="module")
def pipe() -> StableDiffusionPipeline:
    from diffstack.engine.loading import DEFAULT_MODEL_DIR

    pipeline = StableDiffusionPipeline.from_pretrained(str(DEFAULT_MODEL_DIR), use_safetensors=True)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def test_scale_zero_euler_cfgpp_matches_diffusers_euler_on_the_empty_prompt(
    pipe: StableDiffusionPipeline,
) -> None:
    # λ = 0 denoises and re-noises with ε_u alone: diffusers without guidance (scale 1) on "" does the same
    ours = generate(
        pipe, ["a small red circle at the top left on a blue background"], [3], 4, 0.0, "euler_cfgpp"
    )
    theirs = pipe(
        [""], guidance_scale=1.0, num_inference_steps=4, generator=[torch.Generator().manual_seed(3)]
    )
    difference = np.abs(np.asarray(ours[0], dtype=float) - np.asarray(theirs.images[0], dtype=float))
    assert difference.max() <= 1  # uint8 rounding of the same float picture


def test_guidance_changes_the_picture(pipe: StableDiffusionPipeline) -> None:
    prompt = ["a large green square at the bottom right on a white background"]
    unguided, guided = (
        np.asarray(generate(pipe, prompt, [3], 4, scale, "dpmpp_2m_cfgpp")[0]) for scale in (0.0, 0.6)
    )
    assert np.abs(unguided.astype(float) - guided.astype(float)).mean() > 5
