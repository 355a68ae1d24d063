# ruff: noqa: E501  (the card template holds markdown table rows, which cannot be wrapped)
"""Score a freshly exported synthetic-shapes-flux and write its diffstack.json and model card.

The card's numbers come from the same run that trained the weights, beside a randomly initialised
model of the same config scored the same way (the floor the analyser reads from noise). The world,
data and size paragraphs are model_card's, shared with synthetic-shapes-64's card.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import flux_model_spec as spec
from model_card import DATA, WORLD, TrainingFacts, load_generator, size_mb

from diffstack.synthetic.quality import QualityRow, evaluate, fixed_scenes, markdown_table

NAME = "synthetic-shapes-flux"
DEFAULT_STEPS = 20


@dataclass
class Facts(TrainingFacts):
    """synthetic-shapes-64's training facts, plus the flow model's time shift and evaluation time;
    ``eval_device`` when the card's rows were scored elsewhere than the training ran (score_flux_model)
    and ``extra`` for sections that come from outside the run (a GPU quality table)."""

    time_shift: float
    eval_s: float = 0.0
    eval_device: str = ""
    extra: str = ""


def evaluate_models(
    out: Path, random_dir: Path, args: argparse.Namespace
) -> tuple[list[QualityRow], list[QualityRow]]:
    """The trained model at each of --eval-steps flow-Euler steps, and the random one at the first."""
    scenes = fixed_scenes(args.eval_scenes)
    seeds = tuple(int(s) for s in args.eval_seeds.split(","))
    call = {"max_sequence_length": spec.T5_LENGTH, "height": 64, "width": 64}  # FluxPipeline defaults to 1024
    steps = [int(s) for s in args.eval_steps.split(",")]
    trained = load_generator(out, args.device, "FluxPipeline", **call)
    configs = {f"flow euler {n} steps": {"steps": n, "guidance": 1.0} for n in steps}
    rows = evaluate(trained, configs, scenes=scenes, seeds=seeds)
    print(markdown_table(rows), flush=True)
    noise = load_generator(random_dir, args.device, "FluxPipeline", **call)
    random_config = {f"random init, flow euler {steps[0]} steps": {"steps": steps[0], "guidance": 1.0}}
    random_rows = evaluate(noise, random_config, scenes=scenes, seeds=seeds)
    print(markdown_table(random_rows), flush=True)
    return rows, random_rows


def finish(out: Path, facts: Facts, rows: list[QualityRow], random_rows: list[QualityRow]) -> None:
    meta = {
        "name": NAME,
        "weights": "trained",
        "family": "flux",
        "default_width": 64,
        "default_height": 64,
        "default_steps": DEFAULT_STEPS,
        "default_guidance": 1.0,
        "description": "FLUX.1-architecture model trained from scratch with rectified flow on a synthetic "
        "world of coloured shapes, e.g. 'a small red circle at the top left on a blue background'.",
    }
    (out / "diffstack.json").write_text(json.dumps(meta, indent=2) + "\n")
    (out / "README.md").write_text(card_text(out, facts, rows, random_rows))


def denoiser_steps(state: dict[str, Any]) -> str:
    """The phase-2 step count, saying so when the run's wall limit stopped it short of its plan."""
    if state["phase"] == "done":
        return f"{state['totals'].get('denoiser', state['total']):,} steps"
    return (
        f"{state['step']:,} of {state['total']:,} planned steps (stopped by the run's wall limit; "
        "the shipped weights are the EMA at that step)"
    )


def card_text(out: Path, facts: Facts, rows: list[QualityRow], random_rows: list[QualityRow]) -> str:
    a, st, c = facts.args, facts.state, facts.counts
    metrics = markdown_table(rows + random_rows) if rows else "(not evaluated in this run)\n"
    seeds = a["eval_seeds"].replace(",", ", ")
    t = spec.transformer_config()
    return f"""# {NAME}: a FLUX-architecture model of the synthetic world

A FLUX.1-architecture text-to-image model (diffusers FluxPipeline), trained from scratch with
rectified flow in minutes on the synthetic world whose ground truth is known, so that transformer-side
optimizations (first-block cache, compile, SageAttention, flow-matching schedules) can be priced by
`diffstack quality --model {NAME}`. {WORLD}

## Architecture (diffusers FluxPipeline, fp16 safetensors, {size_mb(out):.1f} MB)
| part | class | parameters | notes |
|---|---|---|---|
| VAE | AutoencoderKL | {c["vae"]:,} | FLUX's layout scaled down: 4 blocks (32, 64, 64, 64), 16 latent channels, no quant convs, mid-block attention; factor 8: 64x64x3 -> 8x8x16; shift_factor {st["shift_factor"]:.5f} and scaling_factor {st["scaling_factor"]:.5f} = mean and 1/std of the latents |
| text encoder | CLIPTextModel | {c["text_encoder"]:,} | hidden 64, 2 layers, 77 tokens; its pooled output feeds the transformer's pooled path |
| text encoder 2 | T5EncoderModel | {c["text_encoder_2"]:,} | T5 v1.1 style (gated-GELU, relative attention), d_model 64, 2 layers, 2 heads of 32; 32 tokens |
| tokenizers | CLIPTokenizer x2 | - | the real CLIP BPE (49,408 tokens) for both: no T5 SentencePiece vocabulary can be shipped or fetched offline |
| denoiser | FluxTransformer2DModel | {c["transformer"]:,} | {t["num_layers"]} double-stream + {t["num_single_layers"]} single-stream blocks, {t["num_attention_heads"]} heads of dim {t["attention_head_dim"]}, RoPE axes {tuple(t["axes_dims_rope"])}, 2x2 patches: 16 image tokens + 32 text tokens; no guidance embedding |
| scheduler | FlowMatchEulerDiscreteScheduler | - | FLUX.1-dev's config: shift 3, dynamic shifting (16 tokens: time shift {facts.time_shift:.3f}) |

Weights are stored in fp16 and load as fp32 by default, or in bf16 (FLUX's dtype on CUDA) with
`dtype=`. The model is not guidance-distilled and takes no classifier-free guidance: the engine
passes its guidance scale to FluxPipeline, which ignores it for a model without a guidance embedding.

{DATA}
## Training (`train/train_flux_model.py`, seed {a["seed"]})
- VAE: {st["totals"].get("vae", "?")} steps in {st["wall"]["vae"]:.0f} s, batch {a["vae_batch"]}, AdamW lr {a["vae_lr"]:g}, L1 + MSE + {a["kl_weight"]:g} KL.
- CLIP + T5 + transformer jointly: {denoiser_steps(st)} in {st["wall"]["denoiser"]:.0f} s, batch {a["denoiser_batch"]},
  AdamW lr {a["denoiser_lr"]:g} (warm-up {min(a["warmup"], max(1, (st["totals"].get("denoiser") or st["total"] or 0) // 5))}, cosine to 10%), rectified flow (velocity = noise - x0,
  MSE), t logit-normal then shifted by {facts.time_shift:.3f} as the scheduler shifts at inference,
  float32 with TF32 matmuls and math attention (bf16 and the fused attention backward failed on the
  H200: see CUDA_MICRO_BATCH in the trainer), micro-batches of {a["denoiser_micro_batch"]}, EMA {a["ema"]:g} (the shipped weights).
- Card: {facts.device}, torch {facts.torch}; total training wall time {st["wall"]["vae"] + st["wall"]["denoiser"]:.0f} s;
  step counts planned from the measured speed for `--budget-minutes {a["budget_minutes"]:g}`.
- The same plan again: `--vae-steps {st["totals"].get("vae", "N")} --transformer-steps {st["totals"].get("denoiser", st["total"])}` (explicit step counts skip the
  planning); a run stopped by `--max-run-minutes` resumes from its `--ckpt`.

{facts.extra}## Quality (diffstack.synthetic.quality, {a["eval_scenes"]} fixed prompts x seeds {seeds}, plain diffusers FluxPipeline, {facts.eval_device or a["device"]})
Shipped defaults: {DEFAULT_STEPS} flow-Euler steps, no guidance. The last row is a randomly initialised
model of the same config, scored the same way.

{metrics}
Attribute accuracy is read back from each image by a deterministic analyser; PSNR and SSIM are
against the exact rendering of the prompt.
"""
