"""Architecture and packaging of synthetic-shapes-flux: FLUX.1's layout scaled down to ~13M parameters.

- AutoencoderKL in FLUX's style: 16 latent channels, no quant convs, attention in the mid block,
  4 blocks (factor 8: 64x64x3 -> 8x8x16); shift_factor and scaling_factor measured from the data
  (FLUX.1 ships 0.1159 and 0.3611, measured the same way on its data).
- FluxTransformer2DModel: 2 double-stream (MM-DiT) blocks + 4 single-stream blocks, 3 heads of dim
  64 (inner width 192), RoPE axes (16, 24, 24) like FLUX's (16, 56, 56) scaled to head dim 64, 2x2
  latent patches packed into 64-channel tokens: 16 image tokens at 64x64. No guidance embedding:
  the model is not guidance-distilled (FLUX.1-schnell's choice too), so it is sampled without CFG.
- Text: CLIPTextModel (hidden 64) whose pooled output feeds the transformer's pooled path, and a
  small T5EncoderModel (T5 v1.1 style: gated-GELU, relative attention, d_model 64, 2 layers) whose
  sequence is the transformer's context. No T5 SentencePiece vocabulary can be shipped or fetched
  here, so both read the real CLIP BPE tokenizer (49,408 tokens): CLIP with 77 tokens, the T5 slot
  with 32 (every prompt of the world fits in 18), which keeps the joint sequence at 32 + 16 tokens.
- FlowMatchEulerDiscreteScheduler with FLUX.1-dev's config (shift 3, dynamic shifting on the image
  sequence length: 16 tokens give a shift of exp(0.459) = 1.58).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import default_model_spec
import torch

HEAD_DIM = 64
HEADS = 3
TEXT_HIDDEN = 64
T5_LENGTH = 32
CLIP_LENGTH = 77
SHARD = "12MB"
"""No weight file may reach 15 MiB (what a GPU machine sends back); diffusers shards above this."""
SCHEDULER: dict[str, Any] = {  # FLUX.1-dev's scheduler_config.json
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}


def vae_config() -> dict[str, Any]:
    """The default model's VAE in FLUX's layout: 16 latent channels, no quant convs."""
    return {
        **default_model_spec.vae_config(),
        "latent_channels": 16,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
        "mid_block_add_attention": True,
        "force_upcast": True,
    }


def transformer_config() -> dict[str, Any]:
    return {
        "patch_size": 1,
        "in_channels": 64,
        "num_layers": 2,
        "num_single_layers": 4,
        "attention_head_dim": HEAD_DIM,
        "num_attention_heads": HEADS,
        "joint_attention_dim": TEXT_HIDDEN,
        "pooled_projection_dim": TEXT_HIDDEN,
        "guidance_embeds": False,
        "axes_dims_rope": [16, 24, 24],
    }


def clip_config() -> dict[str, Any]:
    return {
        "vocab_size": 49408,
        "hidden_size": TEXT_HIDDEN,
        "intermediate_size": 4 * TEXT_HIDDEN,
        "num_hidden_layers": 2,
        "num_attention_heads": TEXT_HIDDEN // HEAD_DIM,
        "max_position_embeddings": CLIP_LENGTH,
        "projection_dim": TEXT_HIDDEN,
        "hidden_act": "quick_gelu",
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 49407,
    }


def t5_config() -> dict[str, Any]:
    return {
        "vocab_size": 49408,
        "d_model": TEXT_HIDDEN,
        "d_kv": 32,
        "d_ff": 4 * TEXT_HIDDEN,
        "num_layers": 2,
        "num_heads": 2,
        "relative_attention_num_buckets": 32,
        "relative_attention_max_distance": 128,
        "feed_forward_proj": "gated-gelu",
        "dropout_rate": 0.0,
        "is_encoder_decoder": False,
        "use_cache": False,
        "pad_token_id": 49407,
        "eos_token_id": 49407,
        "decoder_start_token_id": 49407,
    }


def build_models() -> dict[str, Any]:
    """Fresh vae, text_encoder (CLIP), text_encoder_2 (T5) and transformer in fp32; seed torch first."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    return {
        "vae": AutoencoderKL(**vae_config()),
        "text_encoder": CLIPTextModel(CLIPTextConfig(**clip_config())),
        "text_encoder_2": T5EncoderModel(T5Config(**t5_config())),
        "transformer": FluxTransformer2DModel(**transformer_config()),
    }


def tokenizers(tokenizer_files: dict[str, bytes], workdir: Path) -> tuple[Any, Any]:
    """The CLIP BPE tokenizer twice: 77 tokens for CLIP, 32 for the T5 slot."""
    clip = default_model_spec.make_tokenizer(tokenizer_files, workdir)
    t5 = default_model_spec.make_tokenizer(tokenizer_files, workdir)
    t5.model_max_length = T5_LENGTH
    return clip, t5


def flow_scheduler() -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**SCHEDULER)


def save_pipeline(
    out: Path, models: dict[str, Any], tokenizer_files: dict[str, bytes], shift: float, scale: float
) -> None:
    """Write a FluxPipeline folder: fp16 safetensors that load as fp32 by default."""
    from diffusers import FluxPipeline

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    models["vae"].register_to_config(shift_factor=float(shift), scaling_factor=float(scale))
    workdir = tmp.with_name(tmp.name + "-tok")
    clip_tok, t5_tok = tokenizers(tokenizer_files, workdir)
    pipe = FluxPipeline(scheduler=flow_scheduler(), tokenizer=clip_tok, tokenizer_2=t5_tok, **models)
    for model in models.values():
        model.to(device="cpu", dtype=torch.float16)
    pipe.save_pretrained(str(tmp), safe_serialization=True, max_shard_size=SHARD)
    for model in models.values():
        model.to(dtype=torch.float32)
    # transformers 5 loads a checkpoint in its stored dtype unless the config says otherwise, while
    # diffusers loads fp32: declare fp32 so a plain from_pretrained gives one dtype throughout.
    for encoder in ("text_encoder", "text_encoder_2"):
        cfg_path = tmp / encoder / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["dtype"] = "float32"
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    for folder, length in (("tokenizer", CLIP_LENGTH), ("tokenizer_2", T5_LENGTH)):
        tok_dir = tmp / folder  # ship the original BPE files, not the 3.5 MB tokenizer.json
        shutil.rmtree(tok_dir)
        tok_dir.mkdir()
        for name, data in tokenizer_files.items():
            (tok_dir / name).write_bytes(data)
        config = json.loads((tok_dir / "tokenizer_config.json").read_text())
        config["model_max_length"] = length
        (tok_dir / "tokenizer_config.json").write_text(json.dumps(config) + "\n")
    shutil.rmtree(workdir, ignore_errors=True)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def parameter_counts(models: dict[str, Any]) -> dict[str, int]:
    return {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
