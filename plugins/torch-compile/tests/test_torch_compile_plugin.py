"""The torch_compile plugin through pluggy: options, probe reasons, fused projections and call hooks.

No inductor compile here (that is test_torch_compile_cache.py): these run in a second.
"""

from __future__ import annotations

import importlib.util
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pluggy
import pytest
import torch
from peft import LoraConfig

import diffstack.hookspecs
import diffstack_torch_compile
from diffstack.testing import tiny_unet
from diffstack.types import CompileOffer, DenoiserKind, Family, ModelInfo
from diffstack_torch_compile import compiler
from diffstack_torch_compile.config import MODES


def model_on(device: str, options: Mapping[str, Any] | None = None, kind=DenoiserKind.UNET) -> ModelInfo:
    return ModelInfo(
        "tiny", Family.SD1, kind, device, torch.float16, options={"torch_compile": options or {}}
    )


def offer_for(model: ModelInfo, name: str = "torch_compile") -> CompileOffer:
    pm = pluggy.PluginManager("diffstack")
    pm.add_hookspecs(diffstack.hookspecs)
    pm.register(diffstack_torch_compile)
    [offer] = [
        offer for offers in pm.hook.compile_model(model=model) for offer in offers if offer.name == name
    ]
    return offer


def probe(device: str, options: Mapping[str, Any] | None = None) -> str:
    model = model_on(device, options)
    answer = offer_for(model).probe(model)
    return answer.reason if not answer.ok else f"yes: {answer.reason}"


def test_cpu_compiles_in_default_mode_when_allowed(tmp_path: Path) -> None:
    assert (
        probe("cpu", {"cache_dir": str(tmp_path), "allow_cpu": True})
        == f"yes: mode default, cache {tmp_path}"
    )


def test_cpu_is_declined_by_default() -> None:
    assert probe("cpu").startswith("compiles for CUDA only by default, found cpu")


def test_cuda_defaults_to_cuda_graphs() -> None:
    assert diffstack_torch_compile.support.CompileConfig().resolved_mode("cuda:0") == "reduce-overhead"


def test_cuda_without_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    assert probe("cuda") == (
        "triton is not installed (inductor needs it for CUDA: pip install the version your torch pins)"
    )


def test_cpu_without_a_cxx_compiler(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert (
        probe("cpu", {"allow_cpu": True}) == "inductor needs a C++ compiler for CPU code: apt-get install g++"
    )


@pytest.mark.parametrize("mode", ["max-autotune", "max-autotune-no-cudagraphs"])
def test_max_autotune_needs_an_explicit_yes(mode: str) -> None:
    assert probe("cpu", {"mode": mode}).startswith(
        f"mode {mode} compiled the SD1.5 UNet for more than 8 minutes"
    )
    allowed = {"mode": mode, "allow_max_autotune": True, "allow_cpu": True}
    assert probe("cpu", allowed).startswith(f"yes: mode {mode}")


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        ({"mode": "fast"}, "mode: Input should be " + ", ".join(repr(m) for m in MODES[:-1])),
        ({"fullgraph": "yes"}, "fullgraph: Input should be a valid boolean, got 'yes'"),
        ({"backend": "eager"}, "backend: unknown option; known: mode, fullgraph"),
    ],
)
def test_bad_options_are_named(options, reason) -> None:
    assert probe("cpu", options).startswith(f"bad [plugins.options.torch_compile]: {reason}")


def test_unet_projections_fuse_while_diffusers_sdpa_processors_are_in_place() -> None:
    unet = tiny_unet()
    assert compiler.fuse_projections(unet, DenoiserKind.UNET) == "fused QKV projections"
    assert all(type(p).__name__ == "FusedAttnProcessor2_0" for p in unet.attn_processors.values())


def test_unet_projections_stay_apart_under_a_lora_slot() -> None:
    """Fused modules read the base weights: a LoRA on to_q/to_k/to_v would silently drop out."""
    unet = tiny_unet()
    unet.add_adapter(LoraConfig(r=2, target_modules=["to_q", "to_k", "to_v"]))
    processors = {name: type(p) for name, p in unet.attn_processors.items()}
    assert (
        compiler.fuse_projections(unet, DenoiserKind.UNET)
        == "no fused QKV (LoRA adapters sit on the projections)"
    )
    assert {name: type(p) for name, p in unet.attn_processors.items()} == processors


def test_unet_projections_stay_apart_rather_than_replace_the_hosts_kernels() -> None:
    class HostKernelProcessor:
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
            raise AssertionError("not called here")

    unet = tiny_unet()
    installed = {name: HostKernelProcessor() for name in unet.attn_processors}
    unet.set_attn_processor(dict(installed))
    note = compiler.fuse_projections(unet, DenoiserKind.UNET)
    assert note == "no fused QKV (it would replace the installed HostKernelProcessor)"
    assert unet.attn_processors == installed


def test_unet_projections_fuse_under_processors_that_read_fused_weights() -> None:
    from diffstack.attention import KernelAttnProcessor, sdpa

    unet = tiny_unet()
    unet.set_attn_processor(KernelAttnProcessor(sdpa, "sdpa"))
    inputs = {"sample": torch.randn(2, 4, 8, 8), "timestep": torch.tensor(10)}
    inputs["encoder_hidden_states"] = torch.randn(2, 77, unet.config.cross_attention_dim)
    with torch.no_grad():
        before = unet(**inputs).sample
        note = compiler.fuse_projections(unet, DenoiserKind.UNET)
        after = unet(**inputs).sample
    assert note == "fused QKV projections (host attention processors kept)"
    assert all(isinstance(p, KernelAttnProcessor) for p in unet.attn_processors.values())
    torch.testing.assert_close(after, before)


@pytest.mark.slow
def test_calls_are_timed_and_cuda_graph_outputs_handed_out_as_copies(monkeypatch, tmp_path: Path) -> None:
    real_compile = torch.compile
    monkeypatch.setattr(
        torch, "compile", lambda module, **kw: real_compile(module, backend="eager", dynamic=False)
    )
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    monkeypatch.setattr(compiler, "use_cache_dir", lambda path: None)  # leave this process's inductor alone
    unet = tiny_unet()
    inner: list[torch.Tensor] = []
    unet.register_forward_hook(lambda module, args, output: inner.append(output[0]))
    model = model_on("cuda", {"cache_dir": str(tmp_path), "fuse_qkv": False})

    built = offer_for(model).build(unet, model)
    compiled = built.value
    inputs = {
        "sample": torch.randn(2, 4, 8, 8),
        "timestep": torch.tensor([1, 1]),
        "encoder_hidden_states": torch.randn(2, 7, 32),
    }
    with torch.inference_mode():
        [output] = compiled(**inputs, return_dict=False)

    assert compiled.diffstack_compile_seconds > 0
    assert built.notes[0] == "channels_last"
    assert output.data_ptr() != inner[0].data_ptr()
    torch.testing.assert_close(output, inner[0])
    assert not hasattr(unet, "diffstack_compile_seconds")  # the shared eager denoiser stays unlabelled


def test_pipeline_and_host_call_forms_normalize_to_one_so_nothing_recompiles() -> None:
    unet = tiny_unet()
    normalize = compiler._call_normalizer(unet)
    sample, context = torch.randn(2, 4, 8, 8), torch.randn(2, 77, unet.config.cross_attention_dim)
    _, by_host = normalize(
        unet,
        (),
        {
            "sample": sample,
            "timestep": torch.tensor(500.0),
            "encoder_hidden_states": context,
            "return_dict": False,
        },
    )
    _, by_pipeline = normalize(
        unet,
        (sample, torch.tensor(500)),
        {"encoder_hidden_states": context, "timestep_cond": None, "return_dict": False},
    )
    assert by_host.keys() == by_pipeline.keys()
    assert by_pipeline["timestep"].dtype == torch.float32 and by_pipeline["timestep"].ndim == 0
    assert by_pipeline["sample"] is sample


def test_the_batch_dimension_is_marked_dynamic_so_new_batch_sizes_do_not_recompile() -> None:
    unet = tiny_unet()
    normalize = compiler._call_normalizer(unet, dynamic_batch=True)
    sample, context = torch.randn(4, 4, 8, 8), torch.randn(4, 77, unet.config.cross_attention_dim)
    _, named = normalize(unet, (sample, torch.tensor(10)), {"encoder_hidden_states": context})
    for tensor in (named["sample"], named["encoder_hidden_states"]):
        assert 0 in getattr(tensor, "_dynamo_weak_dynamic_indices", set())
    assert not hasattr(named["timestep"], "_dynamo_weak_dynamic_indices")


def test_the_recompile_limit_is_raised_never_lowered() -> None:
    from diffstack_torch_compile.compiler import allow_recompiles

    config = torch._dynamo.config
    before = config.recompile_limit
    try:
        config.recompile_limit = 8
        allow_recompiles(64)
        assert config.recompile_limit == 64
        allow_recompiles(16)
        assert config.recompile_limit == 64
    finally:
        config.recompile_limit = before


@pytest.mark.slow
def test_wrappers_compile_their_own_variant_with_the_offer_s_settings(monkeypatch, tmp_path: Path) -> None:
    """DeepCache on the offer's module compiles its copy through ``diffstack_compile_like``."""
    from diffstack_deepcache.compiled import CompiledDeepCacheHandle
    from diffstack_deepcache.config import DeepCacheConfig

    compiled_modules: list[torch.nn.Module] = []
    real_compile = torch.compile

    def spy(module: torch.nn.Module, **kw: Any) -> Any:
        compiled_modules.append(module)
        return real_compile(module, backend="eager", dynamic=False)

    monkeypatch.setattr(torch, "compile", spy)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    monkeypatch.setattr(compiler, "use_cache_dir", lambda path: None)
    unet = tiny_unet()
    model = model_on("cuda", {"cache_dir": str(tmp_path), "fuse_qkv": False})
    compiled = offer_for(model).build(unet, model).value
    inputs = {
        "sample": torch.randn(2, 4, 8, 8),
        "timestep": torch.tensor(500.0),
        "encoder_hidden_states": torch.randn(2, 7, 32),
    }
    with torch.inference_mode():
        plain = compiled(**inputs, return_dict=False)[0]
        handle = CompiledDeepCacheHandle(compiled, DeepCacheConfig(interval=2))
        full, cached = (compiled(**inputs, return_dict=False)[0] for _ in range(2))
        handle.remove()
    assert len(compiled_modules) == 2 and compiled_modules[1] is not unet  # the copy, compiled alike
    torch.testing.assert_close(full, plain)
    torch.testing.assert_close(cached, plain)  # same inputs: the cached step reproduces the full one
