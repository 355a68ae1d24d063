"""Engine adapters: what differs between model families, and nothing else.

A new family is a new adapter here; no plugin changes. Each adapter knows how its pipeline encodes
prompts, which module denoises, and what a denoiser call looks like (for measuring offers).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, TypeAlias

import torch

from diffstack.types import DenoiserKind, Family, PromptEmbeddings, PromptSpec

Pipeline: TypeAlias = Any
"""A diffusers pipeline. Its components are attributes set at run time, so annotating it as
``Pipeline`` would make every component access a type error."""


class FamilyAdapter:
    """The UNet families' common behaviour (SD1.x and SD2.x use it as it is)."""

    family: Family
    denoiser_kind: ClassVar[DenoiserKind] = DenoiserKind.UNET
    denoiser_attribute: ClassVar[str] = "unet"
    default_sampler: ClassVar[str] = "euler"
    samplers: ClassVar[frozenset[str]] = frozenset(
        {"euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "unipc", "ddim"}
    )
    uses_negative_prompt: ClassVar[bool] = True

    def __init__(self, family: Family) -> None:
        self.family = family

    def denoiser(self, pipe: Pipeline) -> Any:
        return getattr(pipe, self.denoiser_attribute)

    def set_denoiser(self, pipe: Pipeline, module: torch.nn.Module) -> None:
        setattr(pipe, self.denoiser_attribute, module)

    def text_encoders(self, pipe: Pipeline) -> list[torch.nn.Module]:
        return [pipe.text_encoder]

    def encode(self, pipe: Pipeline, spec: PromptSpec) -> PromptEmbeddings:
        """The pipeline's own encoder, for a batch of one."""
        embeds, negative = pipe.encode_prompt(
            spec.prompt,
            pipe._execution_device,
            1,
            spec.classifier_free_guidance,
            spec.negative_prompt or None,
            clip_skip=spec.clip_skip,
        )
        return _without_none({"prompt_embeds": embeds, "negative_prompt_embeds": negative})

    def sample_inputs(self, pipe: Pipeline, batch: int, height: int, width: int) -> dict[str, Any]:
        """Random denoiser inputs of the real shapes, for composing and timing offers."""
        unet = self.denoiser(pipe)
        factor = pipe.vae_scale_factor
        device, dtype = unet.device, unet.dtype
        return {
            "sample": torch.randn(batch, unet.config.in_channels, height // factor, width // factor).to(
                device, dtype
            ),
            "timestep": torch.tensor(500, device=device),
            "encoder_hidden_states": torch.randn(
                batch, pipe.tokenizer.model_max_length, unet.config.cross_attention_dim
            ).to(device, dtype),
        }


class SDXLAdapter(FamilyAdapter):
    """SDXL: two text encoders and pooled embeddings."""

    def text_encoders(self, pipe: Pipeline) -> list[torch.nn.Module]:
        return [pipe.text_encoder, pipe.text_encoder_2]

    def encode(self, pipe: Pipeline, spec: PromptSpec) -> PromptEmbeddings:
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            spec.prompt,
            device=pipe._execution_device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=spec.classifier_free_guidance,
            negative_prompt=spec.negative_prompt or None,
            clip_skip=spec.clip_skip,
        )
        return _without_none(
            {
                "prompt_embeds": embeds,
                "negative_prompt_embeds": negative,
                "pooled_prompt_embeds": pooled,
                "negative_pooled_prompt_embeds": negative_pooled,
            }
        )

    def sample_inputs(self, pipe: Pipeline, batch: int, height: int, width: int) -> dict[str, Any]:
        inputs = super().sample_inputs(pipe, batch, height, width)
        config = self.denoiser(pipe).config
        time_dim = 6 * config.addition_time_embed_dim
        device, dtype = inputs["sample"].device, inputs["sample"].dtype
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, config.projection_class_embeddings_input_dim - time_dim).to(
                device, dtype
            ),
            "time_ids": torch.tensor([[height, width, 0, 0, height, width]] * batch).to(device, dtype),
        }
        return inputs


class FluxAdapter(FamilyAdapter):
    """FLUX: a transformer denoiser, T5 + CLIP pooled embeddings, flow matching, embedded guidance."""

    denoiser_kind = DenoiserKind.TRANSFORMER
    denoiser_attribute = "transformer"
    default_sampler = "flow_euler"
    samplers = frozenset({"flow_euler"})
    uses_negative_prompt = False

    def text_encoders(self, pipe: Pipeline) -> list[torch.nn.Module]:
        return [pipe.text_encoder, pipe.text_encoder_2]

    def encode(self, pipe: Pipeline, spec: PromptSpec) -> PromptEmbeddings:
        embeds, pooled, _text_ids = pipe.encode_prompt(
            spec.prompt,
            prompt_2=None,
            device=pipe._execution_device,
            num_images_per_prompt=1,
            max_sequence_length=_flux_sequence_length(pipe),
        )
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def sample_inputs(self, pipe: Pipeline, batch: int, height: int, width: int) -> dict[str, Any]:
        transformer = self.denoiser(pipe)
        config: Any = transformer.config
        device, dtype = transformer.device, transformer.dtype
        tokens = (height // pipe.vae_scale_factor // 2) * (width // pipe.vae_scale_factor // 2)
        text_len = _flux_sequence_length(pipe)
        inputs: dict[str, Any] = {
            "hidden_states": torch.randn(batch, tokens, config.in_channels).to(device, dtype),
            "encoder_hidden_states": torch.randn(batch, text_len, config.joint_attention_dim).to(
                device, dtype
            ),
            "pooled_projections": torch.randn(batch, config.pooled_projection_dim).to(device, dtype),
            "timestep": torch.full((batch,), 0.5, device=device, dtype=dtype),
            "img_ids": torch.zeros(tokens, 3, device=device, dtype=dtype),
            "txt_ids": torch.zeros(text_len, 3, device=device, dtype=dtype),
        }
        if config.guidance_embeds:
            inputs["guidance"] = torch.full((batch,), 3.5, device=device, dtype=dtype)
        return inputs


def _flux_sequence_length(pipe: Pipeline) -> int:
    return min(512, int(pipe.tokenizer_2.model_max_length))


def _without_none(embeddings: Mapping[str, torch.Tensor | None]) -> dict[str, torch.Tensor]:
    return {key: value for key, value in embeddings.items() if value is not None}


def batch_embeddings(per_image: Sequence[PromptEmbeddings]) -> dict[str, torch.Tensor]:
    """Stack one-image embeddings into the pipeline's batched keyword arguments."""
    return {key: torch.cat([e[key] for e in per_image]) for key in per_image[0]}


def adapter_for(family: Family) -> FamilyAdapter:
    if family is Family.SDXL:
        return SDXLAdapter(family)
    if family is Family.FLUX:
        return FluxAdapter(family)
    return FamilyAdapter(family)
