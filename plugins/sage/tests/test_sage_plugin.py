"""The sage plugin through pluggy: its offer, the probe's reasons and the per-shape answers (CPU)."""

from __future__ import annotations

import sys
from dataclasses import replace

import pluggy
import pytest
import torch
from packaging.version import Version

import diffstack.hookspecs
import diffstack_sage
from diffstack import probes
from diffstack.types import AttentionOffer, AttentionShape, DenoiserKind, Family, ModelInfo
from diffstack_sage import support
from diffstack_sage.config import KERNELS


def model_on(device: str) -> ModelInfo:
    return ModelInfo(
        name="tiny-sd1",
        family=Family.SD1,
        denoiser_kind=DenoiserKind.UNET,
        device=device,
        dtype=torch.float16,
        attention_shapes=(AttentionShape(8, 40, 4096, 4096), AttentionShape(8, 160, 64, 77)),
    )


def offers_for(model: ModelInfo) -> list[AttentionOffer]:
    pm = pluggy.PluginManager("diffstack")
    pm.add_hookspecs(diffstack.hookspecs)
    pm.register(diffstack_sage)
    return [offer for offers in pm.hook.select_attention(model=model) for offer in offers]


@pytest.fixture
def installed(monkeypatch: pytest.MonkeyPatch):
    """Pretend a given sageattention release is installed (metadata only)."""

    def install(version: str | None) -> None:
        found = None if version is None else Version(version)
        monkeypatch.setattr(probes, "installed_version", lambda name: found)  # what needs_distribution reads
        monkeypatch.setattr(support, "installed_version", lambda: found)

    return install


def test_select_attention_offers_sage() -> None:
    [offer] = offers_for(model_on("cpu"))
    assert offer.name == "sage"
    assert offer.priority < 0  # lossy: loses measured ties to exact SDPA


def test_probe_without_cuda_says_what_it_needs() -> None:
    [offer] = offers_for(model_on("cpu"))
    answer = offer.probe(model_on("cpu"))
    assert not answer.ok
    assert answer.reason == "needs a CUDA GPU, found cpu"


def test_probe_without_the_package_says_how_to_install(installed) -> None:
    installed(None)
    [offer] = offers_for(model_on("cuda"))
    assert offer.probe(model_on("cuda")).reason == (
        "sageattention is not installed (pip install sageattention: 1.0.6 on PyPI, 2.x built from source "
        "(see the plugin's README))"
    )


def test_probe_names_a_too_old_gpu(installed, monkeypatch: pytest.MonkeyPatch) -> None:
    installed("1.0.6")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    [offer] = offers_for(model_on("cuda"))
    assert offer.probe(model_on("cuda")).reason == (
        "needs a CUDA GPU with compute capability ≥ 8.0, found compute capability 7.5"
    )


def test_probe_refuses_bad_options_naming_them() -> None:
    model = replace(model_on("cuda"), options={"sage": {"kernel": "fp4"}})
    [offer] = offers_for(model)
    answer = offer.probe(model)
    assert not answer.ok
    assert answer.reason.startswith("bad [plugins.options.sage]: kernel: Input should be 'auto'")
    assert offer.diffusers_backend is None


def test_probe_refuses_a_2x_kernel_on_1x(installed, monkeypatch: pytest.MonkeyPatch) -> None:
    installed("1.0.6")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    model = replace(model_on("cuda"), options={"sage": {"kernel": "fp8_sm90"}})
    [offer] = offers_for(model)
    assert offer.probe(model).reason == "kernel = 'fp8_sm90' needs sageattention 2.x, found 1.0.6"


def test_probe_refuses_the_sm90_kernel_off_hopper(installed, monkeypatch: pytest.MonkeyPatch) -> None:
    installed("2.2.0")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 9))
    model = replace(model_on("cuda"), options={"sage": {"kernel": "fp8_sm90"}})
    [offer] = offers_for(model)
    assert offer.probe(model).reason == (
        "needs a CUDA GPU with compute capability 9.0, found compute capability 8.9"
    )


def test_probe_refuses_auto_where_sageattn_has_no_kernel(installed, monkeypatch: pytest.MonkeyPatch) -> None:
    installed("2.2.0")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (10, 0))
    [offer] = offers_for(model_on("cuda"))
    assert offer.probe(model_on("cuda")).reason == (
        "sageattn has no kernel for compute capability 10.0; "
        "set [plugins.options.sage] kernel = 'fp16_triton'"
    )


def test_probe_names_a_kernel_family_the_build_left_out(
    installed, fake_sage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An sm90-only build (bench/build_kernels.sh's default) has no sm80/sm89 extensions."""
    installed("2.2.0")
    fake_sage("2.2.0", built=("SM90_ENABLED",))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    [offer] = offers_for(model_on("cuda"))
    assert offer.probe(model_on("cuda")).reason == "sageattention 2.2.0, sageattn_qk_int8_pv_fp8_cuda_sm90"
    model = replace(model_on("cuda"), options={"sage": {"kernel": "fp8_cuda"}})
    answer = offers_for(model)[0].probe(model)
    assert not answer.ok
    assert answer.reason == (
        "sageattention 2.2.0 was built without the kernel sageattn_qk_int8_pv_fp8_cuda needs "
        "(SM89_ENABLED is false: its extension is missing or does not import)"
    )
    triton = replace(model_on("cuda"), options={"sage": {"kernel": "fp16_triton"}})
    assert offers_for(triton)[0].probe(triton).ok  # Triton: nothing compiled to miss


def test_probe_reports_an_install_that_does_not_import(installed, monkeypatch: pytest.MonkeyPatch) -> None:
    installed("1.0.6")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setitem(sys.modules, "sageattention", None)  # makes `import sageattention` raise
    [offer] = offers_for(model_on("cuda"))
    answer = offer.probe(model_on("cuda"))
    assert not answer.ok
    assert answer.reason.startswith("sageattention 1.0.6 is installed but does not import")


def test_supports_head_dims_up_to_128_only(installed) -> None:
    installed("2.2.0")
    [offer] = offers_for(model_on("cpu"))
    for head_dim in (40, 64, 80, 96, 128):
        assert offer.supports(AttentionShape(8, head_dim, 4096, 77)).ok
    answer = offer.supports(AttentionShape(8, 160, 256, 256))
    assert not answer.ok
    assert answer.reason == "SageAttention supports head dims up to 128; 160 stays with the next offer"


def test_v1_leaves_key_lengths_off_its_64_block_grid_to_the_next_offer(installed) -> None:
    installed("1.0.6")
    [offer] = offers_for(model_on("cpu"))
    assert offer.supports(AttentionShape(8, 40, 4096, 4096)).ok
    answer = offer.supports(AttentionShape(8, 40, 4096, 77))
    assert answer.reason == (
        "sageattention 1.0.6 gives wrong results unless the key length is a multiple of 64; "
        "77 stays with the next offer"
    )


@pytest.mark.parametrize(
    ("version", "backend"), [(None, None), ("1.0.6", None), ("2.1.1", "sage"), ("2.2.0", "sage")]
)
def test_diffusers_backend_only_where_diffusers_accepts_the_release(installed, version, backend) -> None:
    installed(version)
    [offer] = offers_for(model_on("cuda"))
    assert offer.diffusers_backend == backend


@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_diffusers_backend_follows_the_kernel_option_and_exists_in_diffusers(installed, kernel) -> None:
    from diffusers.models.attention_dispatch import AttentionBackendName

    installed("2.2.0")
    model = replace(model_on("cuda"), options={"sage": {"kernel": kernel}})
    [offer] = offers_for(model)
    assert offer.diffusers_backend == KERNELS[kernel].diffusers_backend
    assert AttentionBackendName(offer.diffusers_backend)  # a name diffusers 0.42 registers
