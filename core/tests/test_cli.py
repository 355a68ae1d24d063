"""The diffstack command as a user runs it, in-process."""

from __future__ import annotations

import json
from importlib.metadata import EntryPoint
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffstack import cli
from diffstack.cli import COMMANDS_GROUP, main
from diffstack.testing import BASELINE_PLUGINS


@pytest.fixture
def env(models_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DIFFSTACK_PLUGINS__ALLOW", json.dumps(list(BASELINE_PLUGINS)))
    monkeypatch.setenv("DIFFSTACK_ENGINE__DEFAULT_MODEL", "tiny-sd1")
    return models_dir


def test_generate_writes_one_png_per_image(
    env: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "pics" / "out.png"
    code = main(
        [
            "--models-dir",
            str(env),
            "generate",
            "a red circle",
            "-o",
            str(out),
            "--steps",
            "2",
            "-n",
            "2",
            "--seed",
            "9",
        ]
    )
    assert code == 0
    images = [Image.open(tmp_path / "pics" / f"out-{i}.png") for i in range(2)]
    assert [i.size for i in images] == [(64, 64), (64, 64)]
    assert not np.array_equal(np.asarray(images[0]), np.asarray(images[1]))
    assert "seed=9" in capsys.readouterr().out


def test_generate_reports_bad_input_by_field(
    env: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["--models-dir", str(env), "generate", "x", "-o", str(tmp_path / "o.png"), "--width", "63"])
    assert code == 2
    assert "width:" in capsys.readouterr().err


def test_plugins_lists_the_baselines_as_json(env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plugins", "--json"]) == 0
    records = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(BASELINE_PLUGINS) <= set(records)
    assert records["sdpa"]["distribution"] == "diffstack-sdpa" and records["sdpa"]["status"] == "loaded"


def test_plugins_table_is_readable(env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plugins"]) == 0
    header = capsys.readouterr().out.splitlines()[0].split()
    assert header[:4] == ["name", "distribution", "version", "entry"]


def test_stack_prints_the_report(env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--models-dir", str(env), "stack", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"] == "tiny-sd1"
    assert {s["slot"] for s in report["slots"]} == {
        "select_attention",
        "build_sigmas",
        "encode_prompt",
        "wrap_denoiser",
        "compile_model",
    }
    assert main(["--models-dir", str(env), "stack"]) == 0
    assert "timing skipped on cpu" in capsys.readouterr().out


def test_embedded_default_model_serves_with_no_configuration(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("DIFFSTACK_PLUGINS__ALLOW", json.dumps(list(BASELINE_PLUGINS)))
    out = tmp_path / "default.png"
    assert main(["generate", "a red circle", "-o", str(out), "--steps", "2"]) == 0
    assert Image.open(out).size == (64, 64)


def test_quality_scores_the_embedded_model_far_above_chance(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DIFFSTACK_PLUGINS__ALLOW", json.dumps(list(BASELINE_PLUGINS)))
    args = ["quality", "--scenes", "4", "--seeds", "0", "--steps", "10", "--schedule", "default"]
    assert main(args) == 0
    row = capsys.readouterr().out.strip().splitlines()[-1]
    overall = float(row.split("|")[8].strip().strip("*"))
    assert overall >= 80.0, row


def test_generate_names_an_unreadable_init_image(
    env: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "not-a-picture.png"
    bad.write_text("hello")
    code = main(
        ["--models-dir", str(env), "generate", "x", "-o", str(tmp_path / "o.png"), "--init-image", str(bad)]
    )
    assert code == 2
    assert "init_image: cannot read" in capsys.readouterr().err


def test_a_broken_command_entry_point_is_reported_and_skipped(
    env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = EntryPoint("broken", "diffstack_no_such_module:register_commands", COMMANDS_GROUP)
    monkeypatch.setattr(cli, "entry_points", lambda group: [broken] if group == COMMANDS_GROUP else [])
    assert main(["plugins", "--json"]) == 0
    err = capsys.readouterr().err
    assert "commands from diffstack_no_such_module:register_commands are unavailable" in err
    assert "ModuleNotFoundError" in err
