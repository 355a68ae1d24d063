"""CFG++ through gRPC on the embedded trained model: a request names the sampler, the host runs the
plugin's real update (not plain Euler), and bad guidance or names are INVALID_ARGUMENT naming the
offers. The trained model, not a tiny random one: random cross-attention barely conditions, so its
two halves agree and CFG++ and Euler would draw the same picture."""

from __future__ import annotations

import io
from collections.abc import Iterator

import numpy as np
import pytest
from diffusers import StableDiffusionPipeline
from PIL import Image

from diffstack.config import load_settings
from diffstack.engine import Engine, GenerationJob, GenerationRequest, GenerationResult
from diffstack.engine.loading import DEFAULT_MODEL_DIR
from diffstack.plugins import load_plugins
from diffstack.testing import BASELINE_PLUGINS
from diffstack_cfgpp.pipeline import generate as reference_generate
from diffstack_client import DiffstackClient, ServiceError
from diffstack_server.testing import serving_client

PROMPT = "a small red circle at the top left on a blue background"
STEPS = 4


SETTINGS = {
    "plugins": {"allow": [*BASELINE_PLUGINS, "cfgpp"]},
    "server": {"port": 0, "metrics_port": 0, "batch_wait_ms": 0, "warm_batches": False},
}


@pytest.fixture(scope="module")
def engine() -> Engine:
    settings = load_settings(None, **SETTINGS)
    return Engine.start(settings, load_plugins(settings.plugins))


@pytest.fixture(scope="module")
def client(engine: Engine) -> Iterator[DiffstackClient]:
    with serving_client(load_settings(None, **SETTINGS), engine) as client:
        yield client


def _pixels(client: DiffstackClient, **params: object) -> np.ndarray:
    result = client.generate(PROMPT, steps=STEPS, seed=7, schedule="default", **params)  # type: ignore[arg-type]
    return np.asarray(Image.open(io.BytesIO(result.images[0].data)).convert("RGB"), dtype=float)


@pytest.mark.parametrize("sampler", ["euler_cfgpp", "dpmpp_2m_cfgpp"])
def test_select_sampler_runs_the_plugins_update_through_grpc(client: DiffstackClient, sampler: str) -> None:
    served = _pixels(client, sampler=sampler, guidance=0.7)
    # The formula-level reference: the plugin's own update driven over the same modules, noise and
    # Euler sigmas, outside the host (diffstack_cfgpp.pipeline).
    pipe = StableDiffusionPipeline.from_pretrained(str(DEFAULT_MODEL_DIR), use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    (expected,) = reference_generate(pipe, [PROMPT], [7], STEPS, 0.7, sampler)
    assert np.abs(served - np.asarray(expected, dtype=float)).max() <= 1  # uint8 rounding apart
    # ... and it is not ordinary Euler with CFG at the model's scale, nor at the same number (which,
    # below 1, is the conditional prediction alone).
    for guidance in (None, 0.7):
        euler = _pixels(client, sampler="euler", **({} if guidance is None else {"guidance": guidance}))
        assert np.abs(served - euler).max() > 16  # a different picture, not rounding


def test_select_sampler_reports_the_offers_and_the_sampler_that_ran(client: DiffstackClient) -> None:
    result = client.generate(PROMPT, steps=2, seed=1, sampler="dpmpp_2m_cfgpp")  # its default λ
    assert result.stack["select_sampler"] == ("dpmpp_2m_cfgpp",)
    assert client.generate(PROMPT, steps=2, seed=1).stack["select_sampler"] == ()
    report = client.stack()
    slot = next(s for s in report.slots if s.slot == "select_sampler")
    offered = {c.offer: c for c in slot.candidates}
    assert set(offered) == {"euler_cfgpp", "dpmpp_2m_cfgpp"}
    assert all(c.status == "available" and c.numeric_error is not None for c in offered.values())
    assert all(c.numeric_error < 1e-5 for c in offered.values())  # type: ignore[operator]
    (cfgpp,) = [p for p in client.plugins() if p.name == "cfgpp"]
    assert cfgpp.hooks == ("select_sampler",)


@pytest.mark.parametrize(
    ("params", "field", "says"),
    [
        ({"sampler": "euler_cfgpp", "guidance": 4.0}, "spec.guidance", "between 0 and 1 for sampler"),
        ({"sampler": "lms"}, "spec.sampler", "euler_cfgpp"),
    ],
)
def test_select_sampler_refuses_bad_requests_naming_the_offers(
    client: DiffstackClient, params: dict[str, object], field: str, says: str
) -> None:
    with pytest.raises(ServiceError) as failure:
        client.generate(PROMPT, steps=2, **params)  # type: ignore[arg-type]
    assert failure.value.code.name == "INVALID_ARGUMENT"
    assert says in failure.value.violations[field]


def test_select_sampler_batches_by_the_exact_guidance_and_each_image_stays_its_own(engine: Engine) -> None:
    """One λ per pipeline call (the step takes one scale): requests at another λ form another batch;
    requests at one λ share a call, and each image is the one it is alone."""

    def prepared(seed: int, guidance: float) -> GenerationRequest:
        request = GenerationRequest(PROMPT, steps=3, seeds=(seed,), sampler="euler_cfgpp", guidance=guidance)
        return engine.prepare(request)

    first, second, other = prepared(1, 0.5), prepared(2, 0.5), prepared(1, 0.8)
    assert engine.batch_key(first) == engine.batch_key(second) != engine.batch_key(other)
    together = engine.run([GenerationJob(first), GenerationJob(second)])
    for request, batched in zip((first, second), together, strict=True):
        (alone,) = engine.run([GenerationJob(request)])
        assert isinstance(alone, GenerationResult) and isinstance(batched, GenerationResult)
        a, b = (np.asarray(r.images[0].image, dtype=float) for r in (alone, batched))
        assert np.abs(a - b).max() <= 1
