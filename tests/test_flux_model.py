"""synthetic-shapes-flux end to end on CPU: the trainer's architecture, saved by the trainer's own
exporter, found by name among the embedded models, served by the engine and scored by
`diffstack quality --model synthetic-shapes-flux`.

Until the trained weights are committed these run on a randomly initialised model of the shipped
config (the wiring, not the accuracy); the accuracy margin over random is test_flux_model_quality's.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from diffstack.cli import main
from diffstack.engine import loading
from diffstack.testing import BASELINE_PLUGINS, TOKENIZER_DIR

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "train"))

import default_model_spec  # noqa: E402
import flux_model_spec  # noqa: E402

pytestmark = pytest.mark.slow
NAME = "synthetic-shapes-flux"


@pytest.fixture(scope="module")
def shipped(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised model of the shipped config, in an embedded-models folder of its own."""
    folder = tmp_path_factory.mktemp("embedded")
    torch.manual_seed(0)
    files = default_model_spec.load_tokenizer_files(TOKENIZER_DIR)
    flux_model_spec.save_pipeline(folder / NAME, flux_model_spec.build_models(), files, 0.1, 0.9)
    card = {"name": NAME, "weights": "random", "default_width": 64, "default_height": 64, "default_steps": 4}
    (folder / NAME / "diffstack.json").write_text(json.dumps(card))
    return folder


@pytest.fixture
def embedded(shipped: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(loading, "EMBEDDED_MODELS_DIR", shipped)
    monkeypatch.setenv("DIFFSTACK_PLUGINS__ALLOW", json.dumps(list(BASELINE_PLUGINS)))
    return shipped / NAME


def test_the_exported_folder_is_a_flux_pipeline_with_small_files(embedded: Path) -> None:
    assert loading.detect_family(embedded).value == "flux"
    vae = json.loads((embedded / "vae" / "config.json").read_text())
    assert vae["latent_channels"] == 16 and (vae["shift_factor"], vae["scaling_factor"]) == (0.1, 0.9)
    files = [p for p in embedded.rglob("*") if p.is_file()]
    assert max(p.stat().st_size for p in files) < 15 * 2**20  # what a GPU machine can send back
    assert sum(p.stat().st_size for p in files) < 40e6
    tok2 = json.loads((embedded / "tokenizer_2" / "tokenizer_config.json").read_text())
    assert tok2["model_max_length"] == flux_model_spec.T5_LENGTH


@pytest.mark.parametrize("schedule", ["default", "flow_arcsine"])
def test_quality_scores_the_model_by_name(
    embedded: Path, schedule: str, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["quality", "--model", NAME, "--scenes", "2", "--seeds", "0", "--steps", "2"]
    assert main([*args, "--schedule", schedule]) == 0
    row = capsys.readouterr().out.strip().splitlines()[-1]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "2" and f"schedule={schedule}" in cells[0], row
