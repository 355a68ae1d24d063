"""synthetic-shapes-flux end to end on CPU: the trainer's exporter writes a FLUX pipeline of small
files; the shipped model is found by name among the embedded models, scored by `diffstack quality
--model synthetic-shapes-flux` and served through gRPC (`diffstack serve --model synthetic-shapes-flux`).

The accuracy margin over a random model is core/tests/test_flux_model_quality.py's.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from diffstack.cli import main
from diffstack.config import load_settings
from diffstack.engine import loading
from diffstack.synthetic.analysis import analyse
from diffstack.synthetic.scenes import Scene
from diffstack.testing import BASELINE_PLUGINS, TOKENIZER_DIR
from diffstack_client import DiffstackClient
from diffstack_server.testing import serving_client

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "train"))

import default_model_spec  # noqa: E402
import flux_model_spec  # noqa: E402

pytestmark = pytest.mark.slow
NAME = "synthetic-shapes-flux"


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised model of the shipped config, written by the trainer's exporter."""
    folder = tmp_path_factory.mktemp("exported") / NAME
    torch.manual_seed(0)
    files = default_model_spec.load_tokenizer_files(TOKENIZER_DIR)
    flux_model_spec.save_pipeline(folder, flux_model_spec.build_models(), files, 0.1, 0.9)
    return folder


@pytest.fixture
def baseline_plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DIFFSTACK_PLUGINS__ALLOW", json.dumps(list(BASELINE_PLUGINS)))


def test_the_exported_folder_is_a_flux_pipeline_with_small_files(exported: Path) -> None:
    assert loading.detect_family(exported).value == "flux"
    vae = json.loads((exported / "vae" / "config.json").read_text())
    assert vae["latent_channels"] == 16 and (vae["shift_factor"], vae["scaling_factor"]) == (0.1, 0.9)
    files = [p for p in exported.rglob("*") if p.is_file()]
    assert max(p.stat().st_size for p in files) < 15 * 2**20  # what a GPU machine can send back
    assert sum(p.stat().st_size for p in files) < 40e6
    tok2 = json.loads((exported / "tokenizer_2" / "tokenizer_config.json").read_text())
    assert tok2["model_max_length"] == flux_model_spec.T5_LENGTH


def test_the_shipped_model_is_found_by_name() -> None:
    path = loading.embedded_model_path(NAME)
    assert path == loading.EMBEDDED_MODELS_DIR / NAME and NAME in loading.embedded_model_names()
    assert loading.detect_family(path).value == "flux"
    assert loading.ModelCard.read(path).weights == "trained"


@pytest.mark.parametrize("schedule", ["default", "flow_arcsine"])
def test_quality_scores_the_model_by_name(
    baseline_plugins: None, schedule: str, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["quality", "--model", NAME, "--scenes", "4", "--seeds", "0", "--steps", "8"]
    assert main([*args, "--schedule", schedule]) == 0
    row = capsys.readouterr().out.strip().splitlines()[-1]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "4" and f"schedule={schedule}" in cells[0], row
    assert float(cells[7].strip("*")) >= 80.0, row  # overall accuracy: the trained model, not noise


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DiffstackClient]:
    """A server started as `diffstack serve --model synthetic-shapes-flux` (no models directory)."""
    settings = load_settings(
        None,
        plugins={"allow": list(BASELINE_PLUGINS)},
        engine={"default_model": NAME, "warmup_steps": 0},
        server={"port": 0, "metrics_port": 0, "batch_wait_ms": 0, "warm_batches": False},
    )
    with serving_client(settings) as client:
        yield client


@pytest.mark.parametrize("named", [False, True])
def test_the_server_draws_the_prompt_with_the_model_through_grpc(
    client: DiffstackClient, named: bool
) -> None:
    scene = Scene("circle", "yellow", "large", "top left", "blue")
    params = {"model": NAME} if named else {}
    generation = client.generate(scene.prompt(), steps=8, seed=3, **params)  # type: ignore[arg-type]
    image = generation.images[0].to_pil()
    assert image.size == (64, 64)
    read = analyse(image)
    assert (read.shape, read.colour, read.position, read.background) == (
        "circle",
        "yellow",
        "top left",
        "blue",
    )
    (listed,) = [m for m in client.models() if m.name == NAME]
    assert listed.loaded and listed.is_default and listed.family == "flux"
