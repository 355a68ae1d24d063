"""The sparge plugin through pluggy: its offer, options, the probe's reasons and per-shape answers (CPU)."""

from __future__ import annotations

import importlib.util
import sys
import types
from collections.abc import Mapping
from typing import Any

import pluggy
import pytest
import torch

import diffstack.hookspecs
import diffstack_sparge
from diffstack.types import AttentionOffer, AttentionShape, DenoiserKind, Family, ModelInfo
from diffstack_sparge import support


def model_on(device: str, options: Mapping[str, Any] | None = None) -> ModelInfo:
    return ModelInfo(
        name="tiny-flux",
        family=Family.FLUX,
        denoiser_kind=DenoiserKind.TRANSFORMER,
        device=device,
        dtype=torch.bfloat16,
        options={"sparge": options or {}},
    )


def offer_for(model: ModelInfo) -> AttentionOffer:
    pm = pluggy.PluginManager("diffstack")
    pm.add_hookspecs(diffstack.hookspecs)
    pm.register(diffstack_sparge)
    [offer] = [offer for offers in pm.hook.select_attention(model=model) for offer in offers]
    return offer


def test_select_attention_offers_sparge_as_the_lossiest_candidate() -> None:
    offer = offer_for(model_on("cpu"))
    assert offer.name == "sparge"
    assert offer.priority < 0
    assert (
        offer.diffusers_backend is None
    )  # diffusers has no SpargeAttn backend (it "requires tuning per model")


def pretend_installed(monkeypatch: pytest.MonkeyPatch, installed: bool) -> None:
    """Make Python's module finder answer for spas_sage_attn as if it were (not) installed."""
    find_spec = importlib.util.find_spec

    def finder(name: str, *args: Any) -> Any:
        if name == support.MODULE:
            return object() if installed else None
        return find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", finder)


def test_probe_without_cuda() -> None:
    assert offer_for(model_on("cpu")).probe(model_on("cpu")).reason == "needs a CUDA GPU, found cpu"


def test_probe_without_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    pretend_installed(monkeypatch, False)
    answer = offer_for(model_on("cuda")).probe(model_on("cuda"))
    assert answer.reason == (
        "spas_sage_attn is not installed (not on PyPI: build thu-ml/SpargeAttn from source)"
    )


@pytest.mark.parametrize(("capability", "found"), [((7, 5), "7.5"), ((10, 0), "10.0"), ((12, 0), "12.0")])
def test_probe_names_an_unsupported_gpu(monkeypatch: pytest.MonkeyPatch, capability, found) -> None:
    pretend_installed(monkeypatch, True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    answer = offer_for(model_on("cuda")).probe(model_on("cuda"))
    assert answer.reason == (
        f"needs a CUDA GPU with compute capability 8.0-9.0, found compute capability {found}"
    )


def test_probe_reports_an_install_that_does_not_import(monkeypatch: pytest.MonkeyPatch) -> None:
    pretend_installed(monkeypatch, True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 9))
    monkeypatch.setitem(sys.modules, "spas_sage_attn", None)
    answer = offer_for(model_on("cuda")).probe(model_on("cuda"))
    assert "is installed but does not import" in answer.reason


def fake_build(kernels: tuple[str, ...]) -> types.ModuleType:
    """``spas_sage_attn`` whose compiled ``_qattn`` (reached as ``core.qattn``) has ``kernels``."""
    qattn = types.ModuleType("spas_sage_attn._qattn")
    for name in kernels:
        setattr(qattn, name, lambda *args: None)
    core = types.ModuleType("spas_sage_attn.core")
    core.qattn = qattn  # type: ignore[attr-defined]
    package = types.ModuleType("spas_sage_attn")
    package.core = core  # type: ignore[attr-defined]
    return package


@pytest.mark.parametrize(("capability", "ok"), [((9, 0), True), ((8, 9), False), ((8, 0), False)])
def test_probe_checks_the_build_has_the_gpus_kernel(monkeypatch: pytest.MonkeyPatch, capability, ok) -> None:
    """An sm90-only build (bench/build_kernels.sh) serves Hopper and says no elsewhere, naming why."""
    pretend_installed(monkeypatch, True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    package = fake_build((support.KERNEL_FOR[(9, 0)],))
    monkeypatch.setitem(sys.modules, "spas_sage_attn", package)
    monkeypatch.setitem(sys.modules, "spas_sage_attn.core", package.core)  # type: ignore[attr-defined]
    answer = offer_for(model_on("cuda")).probe(model_on("cuda"))
    assert answer.ok is ok
    if not ok:
        assert answer.reason.startswith(
            f"spas_sage_attn (unknown version) was built without the kernel for compute capability "
            f"{capability[0]}.{capability[1]} (qk_int8_sv_"
        )


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        ({"topk": 0}, "topk: Input should be greater than 0, got 0"),
        ({"method": "dense"}, "method: Input should be 'topk' or 'cdf', got 'dense'"),
        ({"cdfthreshd": 1.5}, "cdfthreshd: Input should be less than or equal to 1, got 1.5"),
        (
            {"top_k": 0.3},
            "top_k: unknown option; known: method, topk, cdfthreshd, simthreshd1, pvthreshd",
        ),
    ],
)
def test_probe_refuses_bad_options_first(options, reason) -> None:
    answer = offer_for(model_on("cuda", options)).probe(model_on("cuda", options))
    assert answer.reason == f"bad [plugins.options.sparge]: {reason}"


@pytest.mark.parametrize(
    ("shape", "ok"),
    [
        (AttentionShape(24, 128, 4608, 4608), True),  # FLUX joint
        (AttentionShape(10, 64, 4096, 4096), True),  # SDXL self
        (AttentionShape(10, 64, 4096, 77), False),  # SDXL cross: 77 keys
        (AttentionShape(8, 40, 4096, 4096), False),  # SD1.5: head dim 40
        (AttentionShape(8, 160, 256, 256), False),
    ],
    ids=lambda value: value.key if isinstance(value, AttentionShape) else str(value),
)
def test_supports_head_dims_64_and_128_with_at_least_128_tokens(shape: AttentionShape, ok: bool) -> None:
    assert offer_for(model_on("cuda")).supports(shape).ok is ok


def test_supports_says_why_a_shape_stays_with_the_next_offer() -> None:
    offer = offer_for(model_on("cuda"))
    assert offer.supports(AttentionShape(8, 40, 4096, 4096)).reason == (
        "SpargeAttn supports head dims 64, 128; 40 stays with the next offer"
    )
    assert offer.supports(AttentionShape(10, 64, 4096, 77)).reason == (
        "SpargeAttn needs ≥128 query and key tokens, got q4096 k77; it stays with the next offer"
    )
