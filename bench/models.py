"""The benchmark's models: full-size pipelines from the published configs in ``bench/configs``.

Weights are random and created directly on the device in the target dtype (no downloads, no fp32
copy on the host: FLUX's 11.9B parameters take 24 GB in bf16 and would take 48 GB in fp32). A smoke
run uses diffstack's own tiny pipelines instead, on the CPU, through exactly the same code.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffstack.testing import word_tokenizer
from diffstack.types import Family

CONFIGS = Path(__file__).resolve().parent / "configs"


@dataclass(frozen=True)
class Workload:
    """One benchmarked model and the denoiser call the issue measures."""

    key: str
    family: Family
    label: str
    width: int
    height: int
    batch: int
    dtype: torch.dtype

    def for_smoke(self) -> Workload:
        """The same workload on diffstack's tiny model of the family (64x64, float32, CPU)."""
        return Workload(
            self.key, self.family, f"{self.label} [tiny smoke model]", 64, 64, self.batch, torch.float32
        )


WORKLOADS = {
    "sd15": Workload("sd15", Family.SD1, "SD1.5 UNet 512x512 batch 2 (CFG) fp16", 512, 512, 2, torch.float16),
    "sdxl": Workload(
        "sdxl", Family.SDXL, "SDXL UNet 1024x1024 batch 2 (CFG) fp16", 1024, 1024, 2, torch.float16
    ),
    "flux": Workload(
        "flux", Family.FLUX, "FLUX.1 transformer 1024x1024 batch 1 bf16", 1024, 1024, 1, torch.bfloat16
    ),
}


def workload(key: str, smoke: bool) -> Workload:
    chosen = WORKLOADS[key]
    return chosen.for_smoke() if smoke else chosen


def config(name: str) -> dict[str, Any]:
    return json.loads((CONFIGS / name).read_text())


@contextlib.contextmanager
def _created_on(device: str, dtype: torch.dtype) -> Iterator[None]:
    """New parameters are made on ``device`` in ``dtype`` (and initialised there, by the GPU)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def _diffusers_model(cls: Any, name: str, device: str, dtype: torch.dtype) -> Any:
    with _created_on(device, dtype):
        model = cls.from_config(config(name))
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def _clip(name: str, with_projection: bool, device: str, dtype: torch.dtype) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    with _created_on(device, dtype):
        model = cls(CLIPTextConfig(**config(name)))
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def _tokenizer() -> Any:
    from diffstack.testing import clip_tokenizer

    return clip_tokenizer()


def build_pipeline(key: str, device: str, smoke: bool, seed: int = 0) -> Any:
    """The pipeline of workload ``key``: full size on the GPU, or diffstack's tiny one for a smoke run."""
    torch.manual_seed(seed)
    if smoke:
        from diffstack.testing import build_tiny_pipeline

        pipe = build_tiny_pipeline(WORKLOADS[key].family, seed).to(device)
    else:
        builder = {"sd15": _sd15, "sdxl": _sdxl, "flux": _flux}[key]
        pipe = builder(device, WORKLOADS[key].dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sd15(device: str, dtype: torch.dtype) -> Any:
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel

    return StableDiffusionPipeline(
        unet=_diffusers_model(UNet2DConditionModel, "sd15_unet.json", device, dtype),
        vae=_diffusers_model(AutoencoderKL, "sd15_vae.json", device, dtype),
        text_encoder=_clip("clip_l_text_encoder.json", False, device, dtype),
        tokenizer=_tokenizer(),
        scheduler=EulerDiscreteScheduler.from_config(config("sd_scheduler.json")),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _sdxl(device: str, dtype: torch.dtype) -> Any:
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )

    return StableDiffusionXLPipeline(
        unet=_diffusers_model(UNet2DConditionModel, "sdxl_unet.json", device, dtype),
        vae=_diffusers_model(AutoencoderKL, "sdxl_vae.json", device, dtype),
        text_encoder=_clip("clip_l_text_encoder.json", False, device, dtype),
        text_encoder_2=_clip("clip_bigg_text_encoder_2.json", True, device, dtype),
        tokenizer=_tokenizer(),
        tokenizer_2=_tokenizer(),
        scheduler=EulerDiscreteScheduler.from_config(config("sd_scheduler.json")),
        add_watermarker=False,
    )


def _flux(device: str, dtype: torch.dtype) -> Any:
    """FLUX.1's transformer, VAE and CLIP-L at full size; T5 tiny (see configs/README.md)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    return FluxPipeline(
        transformer=_diffusers_model(FluxTransformer2DModel, "flux_transformer.json", device, dtype),
        vae=_diffusers_model(AutoencoderKL, "flux_vae.json", device, dtype),
        text_encoder=_clip("clip_l_text_encoder.json", False, device, dtype),
        tokenizer=_tokenizer(),
        text_encoder_2=tiny_t5(device, dtype),
        tokenizer_2=word_tokenizer(vocab_size=T5_VOCAB, max_length=512),  # FLUX.1-dev's text length
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(config("flux_scheduler.json")),
    )


T5_VOCAB = 1000


def tiny_t5(device: str, dtype: torch.dtype) -> Any:
    """A one-layer T5 encoder as wide as the embeddings FLUX's transformer reads (its
    ``joint_attention_dim``, 4096): T5-XXL's depth costs load time and memory and is not what the
    benchmark measures, but its width is what the transformer's ``context_embedder`` multiplies."""
    from transformers import T5Config, T5EncoderModel

    with _created_on(device, dtype):
        t5 = T5EncoderModel(
            T5Config(
                d_model=config("flux_transformer.json")["joint_attention_dim"],
                d_ff=64,
                d_kv=8,
                num_heads=4,
                num_layers=1,
                vocab_size=T5_VOCAB,
                relative_attention_num_buckets=8,
            )
        )
    return t5.to(device=device, dtype=dtype).eval().requires_grad_(False)


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
