# ruff: noqa: E501  (the card template holds markdown table rows, which cannot be wrapped)
"""Score a freshly exported default model and write its diffstack.json and model card (README.md).

The card's numbers come from the same run that trained the weights. The guidance scale shipped in
diffstack.json is --default-guidance (4 by default): on full prompts accuracy is flat from 1.5 to
7.5 (99.0-99.3% over 288 images), while prompts that leave attributes out only commit to one clean
picture from about 4 up; the sweep in the card lets a retrained model's choice be checked.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from diffstack.synthetic.quality import (
    GenerateFn,
    QualityRow,
    evaluate,
    fixed_scenes,
    markdown_table,
    pipeline_generator,
)
from diffstack.synthetic.scenes import BACKGROUNDS, COLOURS, POSITIONS, SHAPES, SIZES, all_scenes, render

NAME = "synthetic-shapes-64"
DEFAULT_STEPS = 20


@dataclass
class TrainingFacts:
    counts: dict[str, int]
    state: dict[str, Any]
    args: dict[str, Any]
    device: str
    torch: str


def load_generator(
    out: Path, device: str, pipeline: str = "StableDiffusionPipeline", **call: Any
) -> GenerateFn:
    """A plain diffusers ``pipeline`` loaded from ``out``, bound to the quality harness; ``call`` holds
    fixed pipeline arguments (FLUX's max_sequence_length)."""
    import diffusers

    pipe = getattr(diffusers, pipeline).from_pretrained(str(out), use_safetensors=True).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipeline_generator(pipe, batch_size=128, **call)


def save_samples(path: Path, generate: GenerateFn, guidance: float, n: int = 16) -> None:
    """A grid for the eye: n generations (20 steps, seed 0) in the top row, the truths below."""
    scenes = fixed_scenes(n)
    images = generate([s.prompt() for s in scenes], [0] * n, steps=DEFAULT_STEPS, guidance=guidance)
    grid = Image.new("RGB", (64 * n, 128))
    for i, (img, scene) in enumerate(zip(images, scenes, strict=True)):
        grid.paste(img, (64 * i, 0))
        grid.paste(Image.fromarray(render(scene)), (64 * i, 64))
    grid.save(path)


def sweep(out: Path, device: str, guidances: list[float], n_scenes: int, shipped: float) -> list[QualityRow]:
    """Quality at 20 Euler steps for each guidance scale, through a plain diffusers pipeline."""
    generate = load_generator(out, device)
    configs = {f"euler {DEFAULT_STEPS} steps, guidance {g:g}": {"steps": DEFAULT_STEPS, "guidance": g}
               for g in guidances}  # fmt: skip
    configs[f"euler 10 steps, guidance {shipped:g}"] = {"steps": 10, "guidance": shipped}
    return evaluate(generate, configs, scenes=fixed_scenes(n_scenes), seeds=(0, 1, 2))


def finish(out: Path, facts: TrainingFacts, evaluate: bool, samples: str | None = None) -> None:
    rows: list[QualityRow] = []
    guidance = float(facts.args["default_guidance"])
    if evaluate:
        t0 = time.time()
        guidances = [float(x) for x in str(facts.args["guidances"]).split(",")]
        rows = sweep(out, facts.args["device"], guidances, int(facts.args["eval_scenes"]), guidance)
        print(markdown_table(rows), flush=True)
        print(f"evaluation took {time.time() - t0:.1f} s", flush=True)
    meta = {
        "name": NAME,
        "weights": "trained",
        "family": "sd1",
        "default_width": 64,
        "default_height": 64,
        "default_steps": DEFAULT_STEPS,
        "default_guidance": guidance,
        "description": "SD1.5-architecture model trained from scratch on a synthetic world of coloured "
        "shapes, e.g. 'a small red circle at the top left on a blue background'.",
    }
    (out / "diffstack.json").write_text(json.dumps(meta, indent=2) + "\n")
    (out / "README.md").write_text(card_text(facts, rows, guidance))
    if samples:
        save_samples(Path(samples), load_generator(out, facts.args["device"]), guidance)


def size_mb(out: Path) -> float:
    return sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 1e6


WORLD = f"""It draws one shape on a plain background, 64x64:

    a [small|large] <colour> <shape> [<position>] [on a <background> background]

colours {", ".join(COLOURS)}; shapes {", ".join(SHAPES)}; sizes {", ".join(SIZES)};
positions {", ".join(POSITIONS)}; backgrounds {", ".join(BACKGROUNDS)} (never the shape's colour).
Example: "a small red circle at the top left on a blue background". Anything outside this grammar
gives an arbitrary picture: it has seen nothing else.
"""

DATA = f"""## Data
Every one of the {len(all_scenes())} scenes of the world, rendered exactly (anti-aliased with 4x4
supersampling) by `diffstack.synthetic.scenes.render`. Each training prompt leaves out each optional
attribute (size, position, background) with probability 0.1, and 10% of prompts are empty
(classifier-free guidance dropout).
"""


def card_text(facts: TrainingFacts, rows: list[QualityRow], guidance: float) -> str:
    out = Path(facts.args["out"])
    a, st, c = facts.args, facts.state, facts.counts
    sf = st["scaling_factor"]
    metrics = markdown_table(rows) if rows else "(not evaluated in this run)\n"
    return f"""# {NAME}: the embedded default model of diffstack

A Stable Diffusion 1.5-architecture text-to-image model, trained from scratch in minutes on a
synthetic world whose ground truth is known, so that every optimization's effect on quality can be
measured (see `diffstack.synthetic.quality`). {WORLD}

## Architecture (diffusers StableDiffusionPipeline, fp16 safetensors, {size_mb(out):.1f} MB)
| part | class | parameters | notes |
|---|---|---|---|
| VAE | AutoencoderKL | {c["vae"]:,} | 4 blocks (32, 64, 64, 64), factor 8: 64x64x3 -> 8x8x4; scaling_factor {sf:.5f} = 1/std of the latents |
| text encoder | CLIPTextModel | {c["text_encoder"]:,} | hidden 64, 4 layers, 1 head of dim 64, 77 tokens; real CLIP BPE tokenizer (49,408 tokens; the token table is 3.16M of the parameters) |
| denoiser | UNet2DConditionModel | {c["unet"]:,} | SD1.5 block layout (3 CrossAttnDownBlock2D + DownBlock2D, mirrored up), channels (64, 64, 64, 64), layers_per_block 1, cross-attention dim 64, every attention head dim 64 |
| scheduler | EulerDiscreteScheduler | - | SD1.5's: scaled_linear betas 0.00085-0.012, 1000 steps, epsilon prediction, steps_offset 1 |

Weights are stored in fp16 and load as fp32 by default (the text encoder's config says so), or in
fp16/bf16 with `dtype=`. No safety checker, no feature extractor.

{DATA}
## Training (`train/train_default_model.py`, seed {a["seed"]})
- VAE: {st["totals"].get("vae", "?")} steps in {st["wall"]["vae"]:.0f} s, batch {a["vae_batch"]}, AdamW lr {a["vae_lr"]:g}, L1 + MSE + {a["kl_weight"]:g} KL.
- Text encoder + UNet jointly: {st["totals"].get("denoiser", st["total"])} steps in {st["wall"]["denoiser"]:.0f} s, batch {a["denoiser_batch"]},
  AdamW lr {a["denoiser_lr"]:g} (warm-up {a["warmup"]}, cosine to 10%), min-SNR-5 weighted epsilon loss,
  bf16 autocast, EMA {a["ema"]:g} (the shipped weights).
- Card: {facts.device}, torch {facts.torch}; total training wall time {st["wall"]["vae"] + st["wall"]["denoiser"]:.0f} s.

## Quality (diffstack.synthetic.quality, {a["eval_scenes"]} fixed prompts x seeds 0, 1 and 2, plain diffusers, {a["device"]})
Shipped defaults: {DEFAULT_STEPS} Euler steps, guidance {guidance:g}.

{metrics}
Attribute accuracy is read back from each image by a deterministic analyser; PSNR and SSIM are
against the exact rendering of the prompt.
"""
