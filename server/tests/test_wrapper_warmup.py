"""Wrappers on the compiled denoiser (DeepCache) are not warmed while the model loads: the server
warms them after SERVING, and a DeepCache request works before and after.

The compiled stack is a test plugin's: ``torch.compile`` with Dynamo's ``eager`` backend (a compiled
module as DeepCache sees it, without inductor's C++ build on a CPU)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import torch

from diffstack import CompileOffer, ModelInfo, hookimpl
from diffstack.engine import Engine
from diffstack.plugins import load_plugins
from diffstack.testing import BASELINE_PLUGINS
from diffstack.types import PluginRecord, PluginStatus
from diffstack_client import DiffstackClient
from diffstack_server.background import BackgroundServer
from diffstack_server.testing import WAIT_S

COMPILE_LIKE = "diffstack_compile_like"  # what the torch_compile offer sets for DeepCache


def compile_like(module: torch.nn.Module) -> torch.nn.Module:
    compiled = torch.compile(module, backend="eager", dynamic=False)
    object.__setattr__(compiled, COMPILE_LIKE, compile_like)
    return compiled  # type: ignore[return-value]


class DynamoCompiler:
    """A plugin whose ``compile_model`` offer wins on priority (a CPU does not time offers)."""

    @hookimpl
    def compile_model(self, model: ModelInfo) -> list[CompileOffer]:
        return [
            CompileOffer(
                name="dynamo_eager", priority=10, build=lambda denoiser, _model: compile_like(denoiser)
            )
        ]


pytestmark = pytest.mark.slow  # Dynamo traces the tiny UNet and DeepCache's copy: seconds on a CPU


def compiled_engine(models_dir: Path, settings_at: Any, **server: Any) -> Engine:
    settings = settings_at(
        models_dir,
        plugins={"allow": [*BASELINE_PLUGINS, "deepcache", "dynamo_eager"]},
        engine={"warmup_steps": 2},
        server={"batch_size": 1, "batch_measure_steps": 3, "wrapper_warm_quiet_s": 0.1, **server},
    )
    host = load_plugins(settings.plugins)
    host.register(DynamoCompiler(), PluginRecord("dynamo_eager", "", "", "", (), PluginStatus.LOADED))
    return Engine.start(settings, host)


def test_deepcache_is_warmed_after_serving_not_while_loading(models_dir: Path, settings_at: Any) -> None:
    engine = compiled_engine(models_dir, settings_at)
    model = engine.model("")
    (compile_slot,) = [slot for slot in model.report.slots if slot.slot == "compile_model"]
    assert list(compile_slot.chosen) == ["dynamo_eager"]
    assert model.unwarmed_wrappers == ["deepcache"]  # the load warmed the plain stack only
    with BackgroundServer(engine.settings, engine) as server:
        deadline = time.monotonic() + WAIT_S
        while model.unwarmed_wrappers and time.monotonic() < deadline:
            time.sleep(0.05)
        assert model.unwarmed_wrappers == []  # warmed after SERVING, on the device thread
        with DiffstackClient(server.target, timeout=WAIT_S) as client:
            stats = dict(client.stats().engine)
            assert stats["startup_warm_after_serving"] == 1.0
            assert stats["startup_wrapper_deepcache_warm_s"] > 0
            generation = client.generate("a cube", steps=3, wrappers={"deepcache": {"interval": 2}})
            (image,) = generation.images
            assert image.to_pil().size == model.default_size
            assert "deepcache" in generation.stack["wrap_denoiser"]


def test_warm_before_serving_warms_deepcache_before_serving(models_dir: Path, settings_at: Any) -> None:
    engine = compiled_engine(models_dir, settings_at, warm_before_serving=True)
    with BackgroundServer(engine.settings, engine) as server:
        assert engine.model("").unwarmed_wrappers == []
        with DiffstackClient(server.target, timeout=WAIT_S) as client:
            assert dict(client.stats().engine)["startup_warm_after_serving"] == 0.0


def test_with_warm_wrappers_off_deepcache_compiles_on_its_first_use(
    models_dir: Path, settings_at: Any
) -> None:
    engine = compiled_engine(models_dir, settings_at, warm_wrappers=False)
    with (
        BackgroundServer(engine.settings, engine) as server,
        DiffstackClient(server.target, timeout=WAIT_S) as client,
    ):
        assert dict(client.stats().engine)["startup_warm_after_serving"] == 0.0
        assert engine.model("").unwarmed_wrappers == ["deepcache"]
        generation = client.generate("a cube", steps=3, wrappers={"deepcache": {}})
        assert len(generation.images) == 1 and "deepcache" in generation.stack["wrap_denoiser"]
