"""The compile_model hook's two slots (denoiser, VAE decode) and its lossy offers, through the host."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

import diffstack_eager
from diffstack import CompileOffer, CompileTarget, ModelInfo, hookimpl
from diffstack.config import load_settings
from diffstack.engine import Engine, GenerationJob, GenerationRequest, GenerationResult
from diffstack.engine.model import load_model
from diffstack.testing import host_with, tiny_model
from diffstack.types import CandidateStatus, Family, StackReport
from diffstack.vae import VaeDecode


class CountingDecode(torch.nn.Module):
    """The VAE's decode through a channels_last copy of its input, counting its calls."""

    def __init__(self, vae: torch.nn.Module, scale: float = 1.0) -> None:
        super().__init__()
        self.decode = VaeDecode(vae)
        self.scale = scale
        self.calls = 0

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.decode(latents.contiguous(memory_format=torch.channels_last)) * self.scale


class vae_offers:  # named like a plugin module: the host names it "vae_offers"
    def __init__(self) -> None:
        self.built: list[CountingDecode] = []

    @hookimpl
    def compile_model(self, model: ModelInfo) -> list[CompileOffer]:
        def right(vae: torch.nn.Module, model: ModelInfo) -> torch.nn.Module:
            self.built.append(CountingDecode(vae))
            return self.built[-1]

        def wrong(vae: torch.nn.Module, model: ModelInfo) -> torch.nn.Module:
            return CountingDecode(vae, scale=1.5)

        target = CompileTarget.VAE_DECODE
        return [
            CompileOffer(name="vae_right", priority=5, build=right, target=target),
            CompileOffer(name="vae_wrong", priority=9, build=wrong, target=target),
        ]


class Noisy(torch.nn.Module):
    def __init__(self, denoiser: torch.nn.Module, drift: float) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.drift = drift

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        (out,) = self.denoiser(*args, **kwargs)
        torch.manual_seed(0)
        noise = torch.randn_like(out)
        return (out + self.drift * noise * out.norm() / noise.norm(),)


class lossy_offers:
    @hookimpl
    def compile_model(self, model: ModelInfo) -> list[CompileOffer]:
        def noisy(denoiser: torch.nn.Module, model: ModelInfo) -> torch.nn.Module:
            return Noisy(denoiser, 0.05)

        return [
            CompileOffer(name="exact_claims_5pct", priority=9, build=noisy),
            CompileOffer(name="lossy_5pct", priority=8, build=noisy, lossy=True),
        ]


def compose(*plugins: Any) -> StackReport:
    path = tiny_model(Family.SD1)
    settings = load_settings(None, engine={"device": "cpu"})
    return load_model(path.name, path, host_with(*plugins), settings).report


def status(report: StackReport, slot: str, offer: str) -> CandidateStatus:
    (candidate,) = [c for c in report.slot(slot).candidates if c.offer == offer]
    return candidate.status


def test_vae_offers_decide_their_own_slot_checked_against_the_vaes_decode() -> None:
    report = compose(diffstack_eager, vae_offers())
    vae_slot = report.slot("compile_vae")
    assert vae_slot.chosen == ("vae_right",)  # unmeasured on a CPU: the best priority that passed
    assert status(report, "compile_vae", "vae_wrong") is CandidateStatus.REJECTED
    assert "relative error" in next(c.reason for c in vae_slot.candidates if c.offer == "vae_wrong")
    assert {c.offer for c in report.slot("compile_model").candidates} == {"eager"}
    assert {c.offer for c in vae_slot.candidates} == {"eager", "vae_right", "vae_wrong"}


def test_a_lossy_offer_passes_within_the_lossy_tolerance_with_its_drift_reported() -> None:
    report = compose(diffstack_eager, lossy_offers())
    assert status(report, "compile_model", "exact_claims_5pct") is CandidateStatus.REJECTED
    (lossy,) = [c for c in report.slot("compile_model").candidates if c.offer == "lossy_5pct"]
    assert report.slot("compile_model").chosen == ("lossy_5pct",)  # unmeasured: priority 8 over eager
    assert lossy.numeric_error is not None and 0.02 < lossy.numeric_error < 0.15
    assert any(note.startswith("lossy: drift") for note in lossy.notes)


def test_the_engine_decodes_through_the_chosen_vae_module_and_says_so(tmp_path: Path) -> None:
    offers = vae_offers()
    path = tiny_model(Family.SD1)
    settings = load_settings(
        None, engine={"device": "cpu", "models_dir": path.parent, "default_model": path.name}
    )
    engine = Engine.start(settings, host_with(diffstack_eager, offers))
    chosen = offers.built[0]
    before = chosen.calls  # the host's check and the engine's warm-up image
    request = engine.prepare(GenerationRequest(prompt="a red cube", seeds=(1,), steps=2, width=64, height=64))
    (result,) = engine.run([GenerationJob(request)])
    assert isinstance(result, GenerationResult)
    assert result.stack["compile_vae"] == ("vae_right",)
    assert chosen.calls == before + 1
    vae = engine.model().pipeline.vae
    assert "decode" not in vars(vae)  # routed only for the call
