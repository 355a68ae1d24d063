"""The plugin's two further offers: the VAE decode compiled, and the fp8-GEMM variant's probe, layer
choice and regional compile. fp8 itself needs a GPU of compute capability 8.9 (bench/ measures it)."""

from __future__ import annotations

import builtins
from pathlib import Path
from typing import Any

import pluggy
import pytest
import torch

import diffstack.hookspecs
import diffstack_torch_compile
from diffstack.testing import tiny_flux_transformer
from diffstack.types import CompileOffer, CompileTarget, DenoiserKind, Family, ModelInfo
from diffstack_torch_compile import compiler, fp8
from diffstack_torch_compile.config import CompileConfig


def offers(model: ModelInfo) -> dict[str, CompileOffer]:
    pm = pluggy.PluginManager("diffstack")
    pm.add_hookspecs(diffstack.hookspecs)
    pm.register(diffstack_torch_compile)
    return {offer.name: offer for answer in pm.hook.compile_model(model=model) for offer in answer}


def model_on(device: str, dtype: torch.dtype = torch.bfloat16, **options: Any) -> ModelInfo:
    kind = DenoiserKind.TRANSFORMER
    return ModelInfo("tiny", Family.FLUX, kind, device, dtype, options={"torch_compile": options})


def reason(model: ModelInfo, name: str) -> str:
    answer = offers(model)[name].probe(model)
    return f"yes: {answer.reason}" if answer.ok else answer.reason


def test_the_offers_target_their_slots_and_fp8_is_lossy() -> None:
    found = offers(model_on("cpu"))
    assert found["torch_compile"].target is CompileTarget.DENOISER and not found["torch_compile"].lossy
    assert found["torch_compile_fp8"].target is CompileTarget.DENOISER and found["torch_compile_fp8"].lossy
    assert found["torch_compile_vae"].target is CompileTarget.VAE_DECODE


def test_fp8_declines_on_a_cpu_with_the_reason() -> None:
    assert reason(model_on("cpu", allow_cpu=True, fp8=True), "torch_compile_fp8") == (
        "fp8 GEMMs need a CUDA GPU of compute capability >= 8.9 (Ada, Hopper), found cpu"
    )


def test_fp8_declines_below_compute_capability_8_9(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert reason(model_on("cuda:0", fp8=True), "torch_compile_fp8") == (
        "fp8 GEMMs need compute capability >= 8.9, this GPU has 8.0"
    )


def test_fp8_declines_without_torchao(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    real = builtins.__import__

    def no_torchao(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.split(".")[0] == "torchao":
            raise ImportError("no torchao")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torchao)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    assert "torchao" in reason(model_on("cuda:0", fp8=True), "torch_compile_fp8")
    assert (
        not offers(model_on("cuda:0", fp8=True))["torch_compile_fp8"].probe(model_on("cuda:0", fp8=True)).ok
    )


def test_fp8_and_the_vae_offer_can_be_turned_off() -> None:
    assert reason(model_on("cuda:0", fp8=False), "torch_compile_fp8") == (
        "fp8 = false in [plugins.options.torch_compile] (the default: its compile is not yet bounded)"
    )
    assert reason(model_on("cuda:0"), "torch_compile_fp8") == reason(
        model_on("cuda:0", fp8=False), "torch_compile_fp8"
    )
    assert reason(model_on("cuda:0", compile_vae=False), "torch_compile_vae") == (
        "compile_vae = false in [plugins.options.torch_compile]"
    )


def test_the_vae_offer_probes_like_the_compile(tmp_path: Path) -> None:
    assert reason(model_on("cpu"), "torch_compile_vae").startswith("compiles for CUDA only by default")
    assert reason(model_on("cpu", allow_cpu=True, cache_dir=str(tmp_path)), "torch_compile_vae") == (
        f"yes: mode default, cache {tmp_path}"
    )


def test_fp8_takes_only_linear_layers_big_enough_and_aligned() -> None:
    keep = fp8.worth_fp8(1024)
    assert keep(torch.nn.Linear(3072, 12288, device="meta"), "ff")
    assert not keep(torch.nn.Linear(256, 3072, device="meta"), "time_embed")
    assert not keep(torch.nn.Linear(3072, 1032 + 4, device="meta"), "odd")
    assert not keep(torch.nn.Conv2d(1024, 1024, 1, device="meta"), "conv")


def tiny_flux() -> torch.nn.Module:
    torch.manual_seed(0)
    transformer: torch.nn.Module = tiny_flux_transformer(1, 2, guidance=False)
    return transformer.eval()


def test_the_fp8_variant_quantizes_before_a_regional_compile(monkeypatch, tmp_path: Path) -> None:
    """On a transformer: fused projections first, then the quantizer (a stand-in here: torchao's fp8
    needs compute capability 8.9), then each repeated block compiled in place (not called here)."""
    compiled: list[str] = []
    monkeypatch.setattr(
        torch.nn.Module, "compile", lambda self, **kwargs: compiled.append(f"{type(self).__name__} {kwargs}")
    )
    seen: list[bool] = []

    def quantize(denoiser: torch.nn.Module) -> str:
        seen.append(denoiser.transformer_blocks[0].attn.fused_projections)
        return "quantized"

    model = model_on("cpu", cache_dir=str(tmp_path), allow_cpu=True)
    config = CompileConfig(cache_dir=str(tmp_path), allow_cpu=True)
    built = compiler.compile_denoiser(tiny_flux(), model, config, quantize=quantize)
    assert seen == [True]
    assert built.notes[0] == "fused QKV projections" and built.notes[1] == "quantized"
    assert built.notes[3] == "regional compile: 3 blocks of 2 kinds (mode default)"
    assert sorted(c.split()[0] for c in compiled) == [
        "FluxSingleTransformerBlock",
        "FluxSingleTransformerBlock",
        "FluxTransformerBlock",
    ]
    assert all("'mode': 'default'" in c for c in compiled)


def test_the_fp8_build_works_on_its_own_copy(monkeypatch, tmp_path: Path) -> None:
    original = tiny_flux()
    before = {k: v.clone() for k, v in original.state_dict().items()}
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kwargs: None)
    monkeypatch.setattr(fp8, "quantizer", lambda model, config: lambda denoiser: "quantized")
    model = model_on("cpu", cache_dir=str(tmp_path), allow_cpu=True)
    built = fp8.build_fp8(original, model, CompileConfig(cache_dir=str(tmp_path), allow_cpu=True))
    assert built.value is not original
    assert not getattr(original.transformer_blocks[0].attn, "fused_projections", False)
    assert all(torch.equal(before[k], v) for k, v in original.state_dict().items())


def test_the_vae_decode_is_compiled_channels_last_with_its_own_artifacts(monkeypatch, tmp_path: Path) -> None:
    """The wiring (inductor itself is exercised by test_torch_compile_cache.py): the decode module
    handed to torch.compile equals the VAE's decode, and the VAE runs channels_last."""
    from diffstack.testing import build_tiny_pipeline

    handed: list[tuple[torch.nn.Module, dict[str, Any]]] = []

    def fake_compile(module: torch.nn.Module, **kwargs: Any) -> torch.nn.Module:
        handed.append((module, kwargs))
        return module

    monkeypatch.setattr(torch, "compile", fake_compile)
    vae = build_tiny_pipeline(Family.SD1, 0).vae
    latents = torch.randn(2, vae.config.latent_channels, 8, 8)
    with torch.no_grad():
        expected = vae.decode(latents, return_dict=False)[0]
    model = ModelInfo("tiny", Family.SD1, DenoiserKind.UNET, "cpu", torch.float32)
    built = compiler.compile_vae_decode(vae, model, CompileConfig(cache_dir=str(tmp_path), allow_cpu=True))
    [(module, kwargs)] = handed
    assert kwargs["mode"] == "default" and built.value is module
    assert built.notes[:2] == ("VAE decode, mode default", "channels_last")
    assert built.notes[2].startswith("no compiled artifacts yet")
    assert vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert torch.allclose(built.value(latents), expected, atol=1e-5)
    assert built.value.diffstack_compile_seconds is not None  # the first call is timed
