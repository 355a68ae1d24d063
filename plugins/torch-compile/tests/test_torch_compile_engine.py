"""Composing and serving share one compiled graph: the host's check and timing call the compiled
denoiser and VAE as the pipeline does (``no_grad``), so the first generation compiles nothing more.

Dynamo guards on inference mode: when the check ran under ``inference_mode``, the first pipeline
call traced and compiled the UNet and the VAE again (12.6 s of an H200's restart). Dynamo's
``eager`` backend stands in for inductor here (the guards are Dynamo's; a CPU build of inductor's
kernels would take minutes)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch._dynamo.utils import counters

from diffstack.engine import Engine
from diffstack.plugins import load_plugins
from diffstack.pytest_plugin import TINY_CARD, tiny_model_name
from diffstack.testing import BASELINE_PLUGINS, baseline_settings, save_tiny_model
from diffstack.types import Family

pytestmark = pytest.mark.slow  # Dynamo traces the tiny UNet and VAE: seconds on a CPU


def test_the_graphs_compose_checked_are_the_ones_generation_runs(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    real_compile = torch.compile

    def eager_backend(module: Any, **options: Any) -> Any:
        options.pop("mode", None)
        return real_compile(module, backend="eager", **options)

    monkeypatch.setattr(torch, "compile", eager_backend)
    name = tiny_model_name(Family.SD1)
    save_tiny_model(Family.SD1, tmp_path / name, metadata=TINY_CARD)
    settings = baseline_settings(
        tmp_path,
        name,
        plugins={
            # Without the eager offers, so the compiled ones win however the timing falls on a CPU.
            "allow": [*(p for p in BASELINE_PLUGINS if p != "eager"), "torch_compile"],
            "options": {"torch_compile": {"allow_cpu": True, "cache_dir": str(tmp_path / "cache")}},
        },
        compose={"measure": "always"},  # check and time every offer, as on CUDA
        engine={"warmup_steps": 2},
    )
    torch._dynamo.reset()
    counters.clear()
    engine = Engine.start(settings, load_plugins(settings.plugins))  # composes, then warms up
    chosen = {slot.slot: slot.chosen for slot in engine.model("").report.slots}
    assert chosen["compile_model"] == ("torch_compile",) and chosen["compile_vae"] == ("torch_compile_vae",)
    assert counters["stats"]["unique_graphs"] == 2  # the UNet and the VAE decode, each traced once
