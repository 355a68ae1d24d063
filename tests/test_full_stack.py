"""Every installed plugin together, discovered through entry points as an admin installs them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from diffstack.config import load_settings
from diffstack.engine import Engine, GenerationJob, GenerationRequest, GenerationResult
from diffstack.types import CandidateStatus


@pytest.fixture(scope="module")
def engine(models_dir: Path) -> Engine:
    """Every installed plugin (no allow list), serving the shared tiny models."""
    return Engine.start(load_settings(engine={"models_dir": models_dir, "default_model": "tiny-sd1"}))


def run(engine: Engine, **fields: object) -> GenerationResult:
    request = engine.prepare(GenerationRequest(**{"prompt": "a red circle", "seeds": (3,), **fields}))  # type: ignore[arg-type]
    (result,) = engine.run([GenerationJob(request)])
    assert isinstance(result, GenerationResult), result
    return result


def test_every_installed_plugin_loads() -> None:
    from diffstack.plugins import load_plugins

    records = load_plugins(load_settings().plugins).records
    assert all(r.status == "loaded" for r in records), [r for r in records if r.status != "loaded"]
    assert {"sdpa", "schedules", "plain_encoder", "eager", "ays", "prompt_cache", "deepcache"} <= {
        r.name for r in records
    }


def test_auto_schedule_is_ays_and_the_prompt_cache_wraps_the_encoder(engine: Engine) -> None:
    report = engine.report()
    assert report.slot("build_sigmas").chosen[0] == "ays"
    assert "prompt_cache" in report.slot("encode_prompt").chosen
    result = run(engine)
    assert result.stack["build_sigmas"] == ("ays",)
    run(engine)
    assert engine.stats()["prompt_cache_hits"] >= 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the CUDA kernels may well be chosen")
def test_gpu_only_offers_say_why_on_a_cpu(engine: Engine) -> None:
    candidates = {c.offer: c for c in engine.report().slot("select_attention").candidates}
    for offer in ("sage", "sparge"):  # both are installed with the workspace (requirements.txt)
        assert candidates[offer].status is CandidateStatus.REJECTED, candidates[offer]
        assert "CUDA" in candidates[offer].reason, candidates[offer]


def test_deepcache_per_request_changes_little_and_leaves_no_trace(engine: Engine) -> None:
    plain = run(engine, schedule="default")
    cached = run(engine, schedule="default", wrappers={"deepcache": {"interval": 2}})
    again = run(engine, schedule="default")
    assert cached.stack["wrap_denoiser"] == ("deepcache",)
    assert not np.array_equal(np.asarray(plain.images[0].image), np.asarray(cached.images[0].image))
    assert np.array_equal(np.asarray(plain.images[0].image), np.asarray(again.images[0].image))


def test_flux_gets_the_first_block_cache_and_not_deepcache(engine: Engine) -> None:
    report = engine.report("tiny-flux")
    statuses = {c.offer: c.status for c in report.slot("wrap_denoiser").candidates}
    assert statuses["first_block_cache"] is CandidateStatus.AVAILABLE
    assert statuses["deepcache"] is CandidateStatus.REJECTED
    result = run(engine, model="tiny-flux", wrappers={"first_block_cache": {"threshold": 0.05}})
    assert result.images[0].image.size == (64, 64)
