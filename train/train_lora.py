"""Train the embedded default model's LoRA (colour-swap): shapes drawn in a swapped colour.

    python train/train_lora.py            # what made the shipped LoRA: ~4 min on 2 CPU cores

The world and renderer are the default model's (``diffstack.synthetic``), the prompts unchanged, but
every target picture draws the shape in its swapped colour (red <-> green, yellow <-> purple; blue and
white stay). None of the swapped colours is a background colour, so every target is a scene of the
world and the quality analyser reads the swap back. Only a rank-8 LoRA on the UNet's attention
projections (``to_q``, ``to_k``, ``to_v``, ``to_out.0``: the modules diffstack's hot-swap slot takes)
learns; the base weights are frozen. The loss is the base model's own (``epsilon_loss``, min-SNR-5 on
SD1.5's schedule). It is saved with diffusers' ``save_lora_weights`` (peft keys plus the adapter's
config as metadata), scored with the analyser with and without the LoRA, and the card is written
beside it. Seeded; bounded by --max-minutes (it stops early and still saves).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "core" / "src"))  # diffstack.synthetic without installing the core
sys.path.insert(0, str(Path(__file__).resolve().parent))

from phase_trainer import P_OMIT, P_UNCOND, log, lr_at  # noqa: E402
from train_default_model import epsilon_loss, sd_alphas_cumprod  # noqa: E402

from diffstack.synthetic.analysis import analyse  # noqa: E402
from diffstack.synthetic.quality import fixed_scenes  # noqa: E402
from diffstack.synthetic.scenes import OPTIONAL_ATTRIBUTES, Scene, all_scenes, render_batch  # noqa: E402

NAME = "colour-swap"
SWAP = {"red": "green", "green": "red", "yellow": "purple", "purple": "yellow"}
TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]
DEFAULT_MODEL = ROOT / "core/src/diffstack/default_model"


def swapped(scene: Scene) -> Scene:
    """The scene the LoRA should draw for ``scene``'s prompt."""
    return replace(scene, colour=SWAP.get(scene.colour, scene.colour))


def prompt_variant(scene: Scene, rng: random.Random) -> str:
    """The prompt with each optional attribute left out at the base model's rate, sometimes empty."""
    if rng.random() < P_UNCOND:
        return ""
    return scene.prompt(omit=[a for a in OPTIONAL_ATTRIBUTES if rng.random() < P_OMIT])


@torch.no_grad()
def target_latents(pipe: Any, scenes: list[Scene]) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every swapped scene's exact rendering, under the model's VAE."""
    pixels = torch.from_numpy(render_batch([swapped(s) for s in scenes])).permute(0, 3, 1, 2)
    images = pixels.float() / 127.5 - 1
    means, stds = [], []
    for chunk in torch.split(images, 256):
        dist = pipe.vae.encode(chunk).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


def train(pipe: Any, args: argparse.Namespace) -> dict[str, Any]:
    from peft import LoraConfig

    unet, text, tokenizer = pipe.unet, pipe.text_encoder, pipe.tokenizer
    unet.requires_grad_(False)
    text.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(
            r=args.rank, lora_alpha=args.rank, target_modules=TARGET_MODULES, init_lora_weights="gaussian"
        )
    )
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    scenes = all_scenes()
    mean, std = target_latents(pipe, scenes)
    scale = pipe.vae.config.scaling_factor
    alphas_cumprod = sd_alphas_cumprod(torch.device("cpu"))
    rng = random.Random(args.seed)
    started, step = time.time(), 0
    unet.train()
    while step < args.steps and time.time() - started < args.max_minutes * 60:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        idx = torch.randint(0, len(scenes), (args.batch,))
        prompts = [prompt_variant(scenes[int(i)], rng) for i in idx]
        ids = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        with torch.no_grad():
            cond = text(ids.input_ids)[0]
        z0 = (mean[idx] + std[idx] * torch.randn_like(mean[idx])) * scale
        loss = epsilon_loss(unet, z0, cond, alphas_cumprod)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 10 == 0:
            log(f"lora step {step}/{args.steps} loss {float(loss.detach()):.5f}")
        step += 1
    unet.eval()
    return {"steps": step, "seconds": round(time.time() - started, 1), "rank": args.rank, "batch": args.batch}


def save(pipe: Any, out: Path) -> Path:
    """The LoRA as diffusers writes it: peft keys under ``unet.`` and the adapter config as metadata."""
    from peft.utils import get_peft_model_state_dict

    out.mkdir(parents=True, exist_ok=True)
    weights = {k: v.to(torch.float16) for k, v in get_peft_model_state_dict(pipe.unet).items()}
    pipe.save_lora_weights(
        str(out),
        unet_lora_layers=weights,
        unet_lora_adapter_metadata=pipe.unet.peft_config["default"].to_dict(),
        weight_name=f"{NAME}.safetensors",
        safe_serialization=True,
    )
    return out / f"{NAME}.safetensors"


@torch.no_grad()
def swap_rate(pipe: Any, scenes: list[Scene], seeds: int) -> float:
    """The share of images whose shape colour the analyser reads as the swapped colour."""
    hits = total = 0
    for seed in range(seeds):
        generator = [torch.Generator("cpu").manual_seed(seed * 1000 + i) for i in range(len(scenes))]
        images = pipe(
            [s.prompt() for s in scenes], num_inference_steps=20, guidance_scale=4.0, generator=generator
        ).images
        for scene, image in zip(scenes, images, strict=True):
            hits += analyse(image).colour == swapped(scene).colour
            total += 1
    return hits / total


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--out", default=str(DEFAULT_MODEL / "loras"))
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--max-minutes", type=float, default=9.0, help="stop (and save) after this")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 survives a busy machine)")
    p.add_argument("--eval-scenes", type=int, default=24, help="swapped-colour scenes scored per seed")
    p.add_argument("--eval-seeds", type=int, default=2)
    args = p.parse_args(argv)
    from diffusers import StableDiffusionPipeline

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    pipe = StableDiffusionPipeline.from_pretrained(args.model, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    scenes = [s for s in fixed_scenes(96) if s.colour in SWAP][: args.eval_scenes]
    facts = train(pipe, args)
    path = save(pipe, Path(args.out))
    log(f"saved {path} ({path.stat().st_size} bytes)")
    if args.eval_scenes:
        facts["swapped_with_lora"] = swap_rate(pipe, scenes, args.eval_seeds)
        pipe.unet.disable_adapters()
        facts["swapped_without_lora"] = swap_rate(pipe, scenes, args.eval_seeds)
        facts["eval_images"] = len(scenes) * args.eval_seeds
        log(f"analyser: {facts}")
    facts |= {"torch": torch.__version__, "device": "cpu", "swap": SWAP, "target_modules": TARGET_MODULES}
    path.with_suffix(".json").write_text(json.dumps(facts, indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    np.random.seed(0)
    sys.exit(main())
