"""Architecture and packaging of the embedded default model (synthetic-shapes-64).

SD1.5's layout scaled down so the whole pipeline is ~15 MB of fp16 safetensors:
- AutoencoderKL with 4 blocks (factor 8: 64x64x3 -> 8x8x4), scaling factor measured from the data;
- CLIPTextModel, hidden 64, read with the real CLIP BPE tokenizer (77 tokens); its 49,408-row token
  table is most of the text encoder, which is why the hidden size stays small;
- UNet2DConditionModel with SD1.5's block types (3 cross-attention down blocks + 1 plain, mirrored
  up), so plugins that index SD1.5's blocks (DeepCache) apply unchanged; every attention head has
  dim 64, which SDPA/flash/SageAttention kernels all support (SD1.5's 40/80/160 need padding);
- SD1.5's noise schedule (scaled_linear 0.00085-0.012, 1000 steps, epsilon), shipped as Euler.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

HEAD_DIM = 64
UNET_CHANNELS = (64, 64, 64, 64)
TEXT_HIDDEN = 64
SCHEDULE: dict[str, Any] = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
}
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json")


def vae_config() -> dict[str, Any]:
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [32, 64, 64, 64],
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 32,
        "sample_size": 64,
    }


def unet_config() -> dict[str, Any]:
    # diffusers' UNet2DConditionModel reads `attention_head_dim` as the number of heads (a known
    # naming quirk; passing num_attention_heads raises), so heads = channels / 64 gives head dim 64.
    return {
        "sample_size": 8,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
        "block_out_channels": list(UNET_CHANNELS),
        "layers_per_block": 1,
        "attention_head_dim": [c // HEAD_DIM for c in UNET_CHANNELS],
        "cross_attention_dim": TEXT_HIDDEN,
        "norm_num_groups": 32,
    }


def text_config() -> dict[str, Any]:
    return {
        "vocab_size": 49408,
        "hidden_size": TEXT_HIDDEN,
        "intermediate_size": 4 * TEXT_HIDDEN,
        "num_hidden_layers": 4,
        "num_attention_heads": TEXT_HIDDEN // HEAD_DIM,
        "max_position_embeddings": 77,
        "projection_dim": TEXT_HIDDEN,
        "hidden_act": "quick_gelu",
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 49407,
    }


def build_models() -> tuple[Any, Any, Any]:
    """Fresh (vae, text_encoder, unet) in fp32; the caller seeds torch first."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    vae = AutoencoderKL(**vae_config())
    text = CLIPTextModel(CLIPTextConfig(**text_config()))
    unet = UNet2DConditionModel(**unet_config())
    return vae, text, unet


def load_tokenizer_files(source: Path) -> dict[str, bytes]:
    """The CLIP BPE files, read into memory (the output folder may be the folder they came from)."""
    return {name: (source / name).read_bytes() for name in TOKENIZER_FILES}


def make_tokenizer(files: dict[str, bytes], workdir: Path) -> Any:
    from transformers import CLIPTokenizer

    workdir.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (workdir / name).write_bytes(data)
    return CLIPTokenizer.from_pretrained(str(workdir), model_max_length=77)


def euler_scheduler() -> Any:
    from diffusers import EulerDiscreteScheduler

    # as SD1.5 ships it (its PNDM config loaded into Euler): steps_offset 1, linspace spacing
    return EulerDiscreteScheduler(**SCHEDULE, steps_offset=1, timestep_spacing="linspace")


def save_pipeline(
    out: Path, vae: Any, text: Any, unet: Any, tokenizer_files: dict[str, bytes], scaling_factor: float
) -> None:
    """Write a StableDiffusionPipeline folder: fp16 safetensors that load as fp32 by default."""
    from diffusers import StableDiffusionPipeline

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    vae.register_to_config(scaling_factor=float(scaling_factor))
    tokenizer = make_tokenizer(tokenizer_files, tmp.with_name(tmp.name + "-tok"))
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=euler_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    for model in (vae, text, unet):
        model.to(device="cpu", dtype=torch.float16)
    pipe.save_pretrained(str(tmp), safe_serialization=True)  # type: ignore[attr-defined]
    for model in (vae, text, unet):
        model.to(dtype=torch.float32)
    # transformers 5 loads a checkpoint in its stored dtype unless the config says otherwise, while
    # diffusers loads fp32: declare fp32 so a plain from_pretrained gives one dtype throughout.
    cfg_path = tmp / "text_encoder" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["dtype"] = "float32"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    tok_dir = tmp / "tokenizer"  # ship the original BPE files, not the 3.5 MB tokenizer.json
    shutil.rmtree(tok_dir)
    tok_dir.mkdir()
    for name, data in tokenizer_files.items():
        (tok_dir / name).write_bytes(data)
    shutil.rmtree(tmp.with_name(tmp.name + "-tok"), ignore_errors=True)
    # keep files the trainer does not write (none today) out of the way: replace atomically-ish
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def parameter_counts(vae: Any, text: Any, unet: Any) -> dict[str, int]:
    def count(m: Any) -> int:
        return sum(p.numel() for p in m.parameters())

    return {"vae": count(vae), "text_encoder": count(text), "unet": count(unet)}
