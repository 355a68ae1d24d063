"""The stable_fast plugin through pluggy: probe reasons from package metadata, and the wiring
against a fake ``sfast`` with upstream's ``compile_unet(m, config)`` and config fields (CPU)."""

from __future__ import annotations

import sys
import types
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pluggy
import pytest
import torch
from packaging.requirements import Requirement

import diffstack.hookspecs
import diffstack_stable_fast
from diffstack.types import CompileOffer, DenoiserKind, Family, ModelInfo
from diffstack_stable_fast import support

PRUNA = support.Installed("stable-fast-pruna", "1.0.8", Requirement("torch<2.10,>=2.9"))


def model_on(
    device: str, kind: DenoiserKind = DenoiserKind.UNET, options: Mapping[str, Any] | None = None
) -> ModelInfo:
    return ModelInfo("tiny", Family.SDXL, kind, device, torch.float16, options={"stable_fast": options or {}})


def offer_for(model: ModelInfo) -> CompileOffer:
    pm = pluggy.PluginManager("diffstack")
    pm.add_hookspecs(diffstack.hookspecs)
    pm.register(diffstack_stable_fast)
    [offer] = [offer for offers in pm.hook.compile_model(model=model) for offer in offers]
    return offer


def reason(model: ModelInfo) -> str:
    return offer_for(model).probe(model).reason


@pytest.fixture
def environment(monkeypatch: pytest.MonkeyPatch):
    def set_to(found: support.Installed | None, torch_version: str) -> None:
        monkeypatch.setattr(support, "installed", lambda: found)
        monkeypatch.setattr(support, "torch_version", lambda: torch_version)

    return set_to


def test_offer_is_named_stable_fast_and_ranks_below_eager() -> None:
    offer = offer_for(model_on("cuda"))
    assert offer.name == "stable_fast" and offer.priority < 0


def test_not_installed_says_what_to_install_and_the_torch_it_needs(environment) -> None:
    environment(None, "2.13.0")
    assert reason(model_on("cuda")) == (
        "stable-fast not installed (pip install stable-fast-pruna; it needs torch>=2.9,<2.10, found 2.13.0)"
    )


def test_installed_for_another_torch_names_both_versions(environment) -> None:
    environment(PRUNA, "2.13.0")
    assert reason(model_on("cuda")) == "stable-fast-pruna 1.0.8 needs torch<2.10,>=2.9, found 2.13.0"


def test_this_machines_real_metadata_gives_an_actionable_reason() -> None:
    answer = offer_for(model_on("cuda")).probe(model_on("cuda"))
    assert not answer.ok and "torch" in answer.reason  # stable-fast has no wheel for torch 2.13


def test_transformers_and_cpus_are_refused(environment) -> None:
    environment(PRUNA, "2.9.1")
    assert reason(model_on("cuda", DenoiserKind.TRANSFORMER)) == (
        "stable-fast compiles UNets (SD1/SD2/SDXL), not transformer models"
    )
    assert reason(model_on("cpu")) == "needs a CUDA GPU, found cpu"


def test_an_extension_that_does_not_load_is_reported(environment, monkeypatch: pytest.MonkeyPatch) -> None:
    environment(support.Installed("stable-fast", "1.0.5", None), "2.9.1")
    monkeypatch.setitem(sys.modules, "sfast", None)
    answer = reason(model_on("cuda", options={"triton": False}))
    assert answer.startswith("stable-fast 1.0.5 does not import with torch 2.9.1")


def test_bad_options_are_named_first() -> None:
    assert reason(model_on("cuda", options={"xformers": True})) == (
        "bad [plugins.options.stable_fast]: xformers: unknown option; "
        "known: cuda_graph, triton, preserve_parameters, prefer_lowp_gemm"
    )


@dataclass
class FakeDefault:
    """upstream's CompilationConfig.Default fields."""

    memory_format: torch.memory_format = torch.contiguous_format
    enable_jit: bool = True
    enable_jit_freeze: bool = True
    preserve_parameters: bool = True
    enable_cnn_optimization: bool = False
    enable_fused_linear_geglu: bool = False
    prefer_lowp_gemm: bool = True
    enable_xformers: bool = False
    enable_cuda_graph: bool = False
    enable_triton: bool = False
    trace_scheduler: bool = False


@pytest.fixture
def fake_sfast(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    compiled: list[Any] = []

    def compile_unet(m, config):
        """Like upstream: replaces ``m.forward`` with a traced (here: counted) one and returns ``m``."""
        compiled.append(config)
        original = m.forward

        def traced(*args, **kwargs):
            compiled.append("traced call")
            return original(*args, **kwargs)

        m.forward = traced
        return m

    package = types.ModuleType("sfast")
    compilers = types.ModuleType("sfast.compilers")
    compiler = types.ModuleType("sfast.compilers.diffusion_pipeline_compiler")
    compiler.CompilationConfig = types.SimpleNamespace(Default=FakeDefault)  # type: ignore[attr-defined]
    compiler.compile_unet = compile_unet  # type: ignore[attr-defined]
    for name, module in [("sfast", package), ("sfast.compilers", compilers), (compiler.__name__, compiler)]:
        monkeypatch.setitem(sys.modules, name, module)
    return compiled


def test_build_compiles_a_proxy_and_leaves_the_shared_denoiser_alone(fake_sfast: list[Any]) -> None:
    denoiser = torch.nn.Linear(3, 3)
    denoiser.config = {"in_channels": 3}  # type: ignore[assignment]  (pipelines read the UNet's config)
    forward_before = denoiser.forward
    model = model_on("cuda", options={"triton": False, "preserve_parameters": False})

    module = offer_for(model).build(denoiser, model)
    x = torch.randn(2, 3)

    torch.testing.assert_close(module(x), denoiser(x))
    assert fake_sfast[-1] == "traced call"
    config = fake_sfast[0]
    assert (config.enable_cuda_graph, config.enable_triton, config.enable_xformers) == (True, False, False)
    assert config.preserve_parameters is False
    assert denoiser.forward == forward_before  # eager and torch.compile candidates see an untouched module
    assert module.config == {"in_channels": 3} and module.weight is denoiser.weight
