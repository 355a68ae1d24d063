"""Engine adapters: everything that differs between model families, in one place per family.

A new family is one new adapter class here, added to :data:`ADAPTERS`; no plugin changes. An adapter
knows how to recognise its models (from the diffusers configs or the weight names), which diffusers
pipeline loads them, its defaults (steps, guidance, size, dtype per device, the size multiple), how
its pipeline encodes prompts, which module denoises, and what a denoiser call looks like.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence, Set
from typing import Any, ClassVar, TypeAlias

import torch

from diffstack.types import DenoiserKind, Family, PromptEmbeddings, PromptSpec

Pipeline: TypeAlias = Any
"""A diffusers pipeline. Its components are attributes set at run time, so annotating it as
``Pipeline`` would make every component access a type error."""


ModelConfigs: TypeAlias = Mapping[str, Mapping[str, Any]]
"""A diffusers folder's component configs by folder name (``unet``, ``transformer``); {} when absent."""


class FamilyAdapter:
    """The UNet families' common behaviour; subclasses say what differs."""

    family: ClassVar[Family]
    pipeline_class_name: ClassVar[str] = "StableDiffusionPipeline"
    """The diffusers pipeline that loads this family (folders and single files alike)."""
    denoiser_kind: ClassVar[DenoiserKind] = DenoiserKind.UNET
    denoiser_attribute: ClassVar[str] = "unet"
    default_sampler: ClassVar[str] = "euler"
    samplers: ClassVar[frozenset[str]] = frozenset(
        {"euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "unipc", "ddim"}
    )
    uses_negative_prompt: ClassVar[bool] = True
    default_steps: ClassVar[int] = 20
    default_guidance: ClassVar[float] = 7.5
    fixed_default_size: ClassVar[int | None] = None
    """The default side in pixels; ``None`` takes the size the denoiser was built for."""
    size_multiple: ClassVar[int] = 8
    """Width and height must be multiples of this (the VAE downsamples by 8)."""
    cuda_dtype: ClassVar[torch.dtype] = torch.float16
    """The dtype on CUDA; CPUs run float32 (half-precision CPU kernels are slow or missing)."""
    guidance_per_image: ClassVar[bool] = True
    """Guidance is classifier-free, applied by the pipeline to the two halves of each prediction:
    images with different scales can share a call (:class:`~diffstack.engine.run.PerImageGuidance`).
    False where guidance is a model input (FLUX's embedded guidance), fixed for the whole call."""

    @classmethod
    def matches_configs(cls, configs: ModelConfigs) -> bool:
        """Whether a diffusers folder with these component configs is of this family."""
        raise NotImplementedError

    @classmethod
    def matches_weights(cls, has: WeightPrefixes) -> bool:
        """Whether a single original-format checkpoint with these weight names is of this family."""
        raise NotImplementedError

    def pipeline_class(self) -> type[Pipeline]:
        import diffusers

        pipeline: type[Pipeline] = getattr(diffusers, self.pipeline_class_name)
        return pipeline

    def dtype(self, device: str) -> torch.dtype:
        """The dtype this family runs in on ``device`` (settings may override it)."""
        return self.cuda_dtype if device.startswith("cuda") else torch.float32

    def default_size(self, pipe: Pipeline) -> tuple[int, int]:
        """The size the denoiser was built for (``fixed_default_size`` where that is not in its config)."""
        if self.fixed_default_size is not None:
            return self.fixed_default_size, self.fixed_default_size
        size = int(self.denoiser(pipe).config.sample_size) * pipe.vae_scale_factor
        return size, size

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

    def vae_latents(self, pipe: Pipeline, height: int, width: int) -> torch.Tensor:
        """Random latents of one image as the pipeline hands them to ``vae.decode``."""
        vae = pipe.vae
        factor = pipe.vae_scale_factor
        channels = int(vae.config.latent_channels)
        return torch.randn(1, channels, height // factor, width // factor).to(vae.device, vae.dtype)

    def decode_upcasts(self, pipe: Pipeline) -> bool:
        """Whether the pipeline converts its VAE to float32 around every decode (new weight storage
        each time, which a compiled, CUDA-graphed decode cannot follow)."""
        return False

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


class WeightPrefixes:
    """Asks whether any weight name of a checkpoint starts with a prefix."""

    def __init__(self, keys: Set[str]) -> None:
        self._keys = keys

    def __call__(self, *prefixes: str) -> bool:
        return any(key.startswith(prefixes) for key in self._keys)


class SD1Adapter(FamilyAdapter):
    """Stable Diffusion 1.x: one CLIP text encoder, a UNet without linear projections."""

    family = Family.SD1

    @classmethod
    def matches_configs(cls, configs: ModelConfigs) -> bool:
        return bool(configs.get("unet", {}))

    @classmethod
    def matches_weights(cls, has: WeightPrefixes) -> bool:
        return has("cond_stage_model.transformer.", "model.diffusion_model.input_blocks.")


class SD2Adapter(FamilyAdapter):
    """Stable Diffusion 2.x: OpenCLIP text encoder, linear projections in the UNet's transformers."""

    family = Family.SD2

    @classmethod
    def matches_configs(cls, configs: ModelConfigs) -> bool:
        return bool(configs.get("unet", {}).get("use_linear_projection"))

    @classmethod
    def matches_weights(cls, has: WeightPrefixes) -> bool:
        return has("cond_stage_model.model.")


class SDXLAdapter(FamilyAdapter):
    """SDXL: two text encoders and pooled embeddings."""

    family = Family.SDXL
    pipeline_class_name = "StableDiffusionXLPipeline"
    default_guidance = 5.0

    @classmethod
    def matches_configs(cls, configs: ModelConfigs) -> bool:
        return configs.get("unet", {}).get("addition_embed_type") == "text_time"

    @classmethod
    def matches_weights(cls, has: WeightPrefixes) -> bool:
        return has("conditioner.embedders.1.")

    def text_encoders(self, pipe: Pipeline) -> list[torch.nn.Module]:
        return [pipe.text_encoder, pipe.text_encoder_2]

    def decode_upcasts(self, pipe: Pipeline) -> bool:
        """SDXL's pipelines upcast an fp16 VAE whose config says ``force_upcast`` (the published one)."""
        vae = pipe.vae
        return bool(vae.dtype == torch.float16 and vae.config.force_upcast)

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

    family = Family.FLUX
    pipeline_class_name = "FluxPipeline"
    denoiser_kind = DenoiserKind.TRANSFORMER
    denoiser_attribute = "transformer"
    default_sampler = "flow_euler"
    samplers = frozenset({"flow_euler"})
    uses_negative_prompt = False
    default_steps = 28
    default_guidance = 3.5
    fixed_default_size = 1024
    size_multiple = 16
    """The VAE's 8, times the 2x2 latent patches the transformer packs into one token."""
    cuda_dtype = torch.bfloat16
    """FLUX was trained in bfloat16; float16 overflows in its activations."""
    guidance_per_image = False

    @classmethod
    def matches_configs(cls, configs: ModelConfigs) -> bool:
        return configs.get("transformer", {}).get("_class_name") == "FluxTransformer2DModel"

    @classmethod
    def matches_weights(cls, has: WeightPrefixes) -> bool:
        return has("double_blocks.", "model.diffusion_model.double_blocks.")

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


ADAPTERS: tuple[FamilyAdapter, ...] = (FluxAdapter(), SDXLAdapter(), SD2Adapter(), SD1Adapter())
"""Every family the engine serves, in the order detection asks them: the most specific first (an SDXL
or SD2 UNet config would also pass SD1's test)."""

_BY_FAMILY = {adapter.family: adapter for adapter in ADAPTERS}


def adapter_for(family: Family) -> FamilyAdapter:
    return _BY_FAMILY[family]
