"""Tiny models of every family, and helpers for testing a plugin through the host's own checks.

Tests, benchmarks' smoke runs and the placeholder default model use these instead of downloads: each
is saved as a real diffusers folder of safetensors and loaded back through the engine's own loader.
Plugin authors test with :func:`assert_offer_passes` (a host with only their plugin, a tiny model of
a family, composition as the server does it) and :func:`compose_with` for the whole report.
"""

from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from diffstack.config import Settings, load_settings
from diffstack.types import CandidateReport, Family, StackReport

if TYPE_CHECKING:
    from diffstack.plugins import PluginHost

BASELINE_PLUGINS = ("sdpa", "schedules", "plain_encoder", "eager")
"""The built-in baseline plugins; tests allow-list them so installed extras never change a result."""

TOKENIZER_DIR = Path(__file__).parent / "default_model" / "tokenizer"
"""The real CLIP BPE tokenizer files, shipped inside the embedded default model."""


def clip_tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer(
        vocab_file=str(TOKENIZER_DIR / "vocab.json"),
        merges_file=str(TOKENIZER_DIR / "merges.txt"),
        model_max_length=77,
    )


def _clip_text_config(hidden: int = 32, projection: int | None = None):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        hidden_size=hidden,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=49408,
        max_position_embeddings=77,
        projection_dim=projection or hidden,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )


def _vae(latent_channels: int = 4, **extra: float):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 16, 16, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=64,
        **extra,
    )


def _sd_scheduler():
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        timestep_spacing="leading",
    )


def _unet(cross_attention_dim: int, **extra: object):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=(2, 2),  # heads per block: head dims 16 and 32, two attention shapes
        norm_num_groups=8,
        **extra,
    )


def tiny_unet() -> Any:
    """A one-level UNet (one attention shape, head dim 8) from seed 0: the smallest a compile test can
    build and compile in seconds, run both in-process and by subprocess scripts."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet: Any = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32,),
        down_block_types=("CrossAttnDownBlock2D",),
        mid_block_type=None,
        up_block_types=("CrossAttnUpBlock2D",),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    return unet.eval()


def build_tiny_pipeline(family: Family, seed: int = 0):
    """A complete pipeline of ``family`` with seeded random weights, small enough for a CPU test."""
    torch.manual_seed(seed)
    if family in (Family.SD1, Family.SD2):
        from diffusers import StableDiffusionPipeline
        from transformers import CLIPTextModel

        return StableDiffusionPipeline(
            unet=_unet(32, use_linear_projection=family is Family.SD2),
            vae=_vae(),
            text_encoder=CLIPTextModel(_clip_text_config()),
            tokenizer=clip_tokenizer(),
            scheduler=_sd_scheduler(),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    if family is Family.SDXL:
        from diffusers import StableDiffusionXLPipeline
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        return StableDiffusionXLPipeline(
            unet=_unet(
                64,
                addition_embed_type="text_time",
                addition_time_embed_dim=8,
                projection_class_embeddings_input_dim=8 * 6 + 32,
                use_linear_projection=True,
            ),
            vae=_vae(),
            text_encoder=CLIPTextModel(_clip_text_config()),
            text_encoder_2=CLIPTextModelWithProjection(_clip_text_config(projection=32)),
            tokenizer=clip_tokenizer(),
            tokenizer_2=clip_tokenizer(),
            scheduler=_sd_scheduler(),
        )
    return _tiny_flux()


def tiny_flux_transformer(double_blocks: int = 1, single_blocks: int = 1, guidance: bool = True) -> Any:
    """The tiny FLUX pipeline's transformer alone (random weights from torch's current seed): by
    default one double and one single block, 2 heads of 16, guidance embedding, 16 latent channels;
    tests of per-block machinery (caches, regional compiles) ask for more blocks."""
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=double_blocks,
        num_single_layers=single_blocks,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=guidance,
        axes_dims_rope=(4, 4, 8),
    )


def _tiny_flux():
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    transformer = tiny_flux_transformer()
    text_encoder_2 = T5EncoderModel(
        T5Config(
            d_model=32,
            d_ff=37,
            d_kv=8,
            num_heads=4,
            num_layers=2,
            vocab_size=1000,
            relative_attention_num_buckets=8,
        )
    )
    return FluxPipeline(
        transformer=transformer,
        vae=_vae(shift_factor=0.0609, scaling_factor=1.5035),
        text_encoder=CLIPTextModel(_clip_text_config()),
        text_encoder_2=text_encoder_2,
        tokenizer=clip_tokenizer(),
        tokenizer_2=word_tokenizer(vocab_size=1000),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )


def word_tokenizer(vocab_size: int, max_length: int = 32) -> Any:
    """A stand-in for T5's SentencePiece tokenizer, whose files cannot be shipped or downloaded here."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = json.loads((TOKENIZER_DIR / "vocab.json").read_text())
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for word in words:
        if len(vocab) >= vocab_size:
            break
        vocab.setdefault(word.removesuffix("</w>"), len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=max_length,
    )


def save_tiny_model(
    family: Family, path: Path, seed: int = 0, metadata: dict[str, object] | None = None
) -> Path:
    """Build a tiny ``family`` pipeline and save it as a diffusers folder of safetensors."""
    pipeline = build_tiny_pipeline(family, seed)
    pipeline.save_pretrained(path, safe_serialization=True)
    if metadata is not None:
        (path / "diffstack.json").write_text(json.dumps(metadata, indent=2) + "\n")
    return path


def save_random_lora(
    denoiser: torch.nn.Module,
    path: Path,
    *,
    rank: int = 4,
    alpha: float | None = None,
    seed: int = 0,
    std: float = 0.1,
    prefix: str = "unet",
) -> Path:
    """A random LoRA on every attention projection of ``denoiser`` (the modules a LoRA slot covers),
    saved as diffusers' ``save_lora_weights`` writes it: peft keys under ``prefix`` and the adapter
    config (rank, alpha) in the safetensors header."""
    from safetensors.torch import save_file

    from diffstack.engine.loras import METADATA_KEY, SLOT_TARGETS, slot_targets

    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for module, (fan_in, fan_out) in slot_targets(denoiser).items():
        weights[f"{prefix}.{module}.lora_A.weight"] = torch.randn(rank, fan_in, generator=generator) * std
        weights[f"{prefix}.{module}.lora_B.weight"] = torch.randn(fan_out, rank, generator=generator) * std
    config = {
        "r": rank,
        "lora_alpha": alpha if alpha is not None else rank,
        "target_modules": list(SLOT_TARGETS),
    }
    metadata = {"format": "pt", METADATA_KEY: json.dumps({f"{prefix}.{k}": v for k, v in config.items()})}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(path), metadata=metadata)
    return path


def baseline_settings(
    models_dir: Path, default_model: str = "tiny-sd1", **sections: dict[str, Any]
) -> Settings:
    """Settings serving ``models_dir`` with only the baseline plugins, whatever else is installed."""
    plugins = {"allow": list(BASELINE_PLUGINS), **sections.pop("plugins", {})}
    engine = {"models_dir": models_dir, "default_model": default_model, **sections.pop("engine", {})}
    return load_settings(None, plugins=plugins, engine=engine, **sections)


# ---------------------------------------------------------------------------------------------
# For plugin authors: your plugin alone in a host, on a tiny model, through the host's own checks
# ---------------------------------------------------------------------------------------------


def host_with(*plugins: Any) -> PluginHost:
    """A plugin host with only ``plugins`` registered (modules or objects), no entry points loaded.

    Each is named after its module (``diffstack_myattn`` → ``myattn``). Compose against it to see
    what your offers do on their own; the host's fallbacks (SDPA, the scheduler's own sigmas, the
    pipeline's encoder, eager execution) still stand in for the slots nobody fills.
    """
    from diffstack.plugins import PluginHost
    from diffstack.types import PluginRecord, PluginStatus

    host = PluginHost()
    for plugin in plugins:
        module_name = getattr(plugin, "__name__", type(plugin).__name__)
        name = module_name.rpartition(".")[2].removeprefix("diffstack_")
        host.register(
            plugin,
            PluginRecord(
                name=name,
                distribution="",
                version="",
                entry_point=module_name,
                hooks=(),
                status=PluginStatus.DISABLED,  # until registered
            ),
        )
        failure = next(r for r in host.records if r.name == name)
        if failure.status is not PluginStatus.LOADED:
            raise AssertionError(f"plugin {name!r} did not load: {failure.error}")
    return host


@functools.cache
def tiny_model(family: Family) -> Path:
    """A tiny model of ``family`` saved once per process in a temporary folder; its path."""
    folder = Path(tempfile.mkdtemp(prefix="diffstack-tiny-"))
    return save_tiny_model(family, folder / f"tiny-{family.value}")


def compose_with(*plugins: Any, family: Family = Family.SD1, settings: Settings | None = None) -> StackReport:
    """Load a tiny ``family`` model with only ``plugins`` and compose its stack: the StackReport."""
    from diffstack.engine.model import load_model

    path = tiny_model(family)
    settings = settings or load_settings(None, engine={"device": "cpu"})
    return load_model(path.name, path, host_with(*plugins), settings).report


def assert_offer_passes(
    *plugins: Any, offer: str, family: Family = Family.SD1, settings: Settings | None = None
) -> list[CandidateReport]:
    """Assert the host accepted ``offer`` on a tiny ``family`` model: its reports (one per attention
    shape), each chosen, available or slower; else an AssertionError with the host's reasons."""
    from diffstack.types import CandidateStatus

    report = compose_with(*plugins, family=family, settings=settings)
    candidates = [c for slot in report.slots for c in slot.candidates if c.offer == offer]
    if not candidates:
        failures = [f"{c.plugin}: {c.reason}" for s in report.slots for c in s.candidates if c.offer == ""]
        raise AssertionError(f"no offer named {offer!r} reached the host {failures or ''}".rstrip())
    refused = [c for c in candidates if c.status in (CandidateStatus.REJECTED, CandidateStatus.FAILED)]
    if refused:
        reasons = "; ".join(f"{c.scope or 'offer'} {c.status.value}: {c.reason}" for c in refused)
        raise AssertionError(f"the host refused {offer!r} on a tiny {family.value} model: {reasons}")
    return candidates
