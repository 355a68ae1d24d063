"""The diffstack command as a user runs it, in-process."""

from __future__ import annotations

import io
import json
import logging
import sys
from importlib.metadata import EntryPoint
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import diffstack
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
        "select_sampler",
        "encode_prompt",
        "wrap_denoiser",
        "compile_model",
        "compile_vae",
    }
    assert main(["--models-dir", str(env), "stack"]) == 0
    assert "timing skipped on cpu" in capsys.readouterr().out


@pytest.mark.slow
def test_embedded_default_model_serves_with_no_configuration(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("DIFFSTACK_PLUGINS__ALLOW", json.dumps(list(BASELINE_PLUGINS)))
    out = tmp_path / "default.png"
    assert main(["generate", "a red circle", "-o", str(out), "--steps", "2"]) == 0
    assert Image.open(out).size == (64, 64)


@pytest.mark.slow
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


# ---------------------------------------------------------------------------------------------
# A quiet, self-explaining command line
# ---------------------------------------------------------------------------------------------


def test_quiet_by_default_and_verbose_on_request(env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plugins", "--json"]) == 0
    assert "plugin loaded" not in capsys.readouterr().err
    assert main(["plugins", "--json", "-v"]) == 0
    assert "plugin loaded" in capsys.readouterr().err
    assert main(["--log-level", "info", "plugins", "--json"]) == 0
    assert "plugin loaded" in capsys.readouterr().err


def test_generate_is_quiet_says_which_stack_and_silences_the_libraries(
    env: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "o.png"
    assert main(["--models-dir", str(env), "generate", "a red circle", "-o", str(out), "--steps", "2"]) == 0
    err = capsys.readouterr().err
    assert "Loading pipeline components" not in err and "accelerate" not in err, err
    assert "model tiny-sd1, stack: attention: sdpa for all 4 shapes; schedule: default; encoder: plain" in err
    assert logging.getLogger("diffusers").level == logging.ERROR


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"diffstack {diffstack.__version__}"


def test_help_shows_defaults_and_choices_and_no_markup(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for expected in (
        "euler, euler_a, dpmpp_2m",
        "(default: auto)",
        "(default: 0.75)",
        "(default: 1, or one per --seed)",
        "default: the model's; 20 for the embedded model",
        "a multiple of 8",
    ):
        assert expected in text
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "``" not in capsys.readouterr().out


def test_global_flags_work_after_the_command_too(
    env: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "x.toml"
    config.write_text('[plugins]\ndeny = ["sdpa"]\n')
    assert main(["plugins", "--config", str(config), "--json"]) == 0
    records = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert records["sdpa"]["status"] == "disabled"
    args = cli.build_parser().parse_args(["stack", "--models-dir", "/m", "-v"])
    assert cli.settings_from_args(args).engine.models_dir == Path("/m")
    assert cli.log_level(args) == logging.INFO


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--steps", "0"], "--steps: must be at least 1, got 0"),
        (["-n", "0"], "--num-images: must be at least 1"),
        (["--sampler", "lms"], "--sampler: invalid choice: 'lms'"),
        (["--seed", "-1"], "--seed: must be between 0 and 2^63 - 1"),
    ],
)
def test_flags_refuse_values_they_would_silently_reinterpret(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "x", *flags])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


@pytest.fixture
def no_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if a command gets as far as loading a model."""

    def refuse(*args: object) -> None:
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(cli, "_start_engine", refuse)


@pytest.mark.usefixtures("no_loading")
@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--strength", "0.5"], "strength: --strength needs --init-image"),
        (["-n", "1", "--seed", "1", "--seed", "2"], "seeds: 2 seeds for -n 1 images"),
        (["--width", "63"], "width: must be a positive multiple of 8, got 63"),
        (["--steps", "151"], "steps: must be between 1 and 150, got 151"),
        (["-n", "9"], "num_images: must be between 1 and 8, got 9"),
        (["--schedule", "linear"], "schedule: no installed plugin offers a schedule named 'linear'"),
        (["--wrapper", "nope"], "wrappers: no installed plugin offers a wrapper named 'nope'"),
    ],
)
def test_input_is_checked_before_any_model_loads(
    env: Path, flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--models-dir", str(env), "generate", "x", *flags]) == 2
    assert message in capsys.readouterr().err


def test_repeated_seeds_mean_one_image_each(
    env: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "s.png"
    argv = [
        "--models-dir",
        str(env),
        "generate",
        "x",
        "-o",
        str(out),
        "--steps",
        "1",
        "--seed",
        "1",
        "--seed",
        "5",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "seed=1" in printed and "seed=5" in printed
    assert (tmp_path / "s-0.png").exists() and (tmp_path / "s-1.png").exists()


def test_a_refused_offer_is_reported_with_the_hosts_reason(
    env: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--models-dir", str(env), "generate", "x", "-o", str(tmp_path / "f.png"), "--model", "tiny-flux"]
    assert main([*argv, "--schedule", "karras"]) == 2
    err = capsys.readouterr().err
    assert "'karras' from plugin schedules was rejected for this model: not made for flux models" in err


def test_stack_summary_counts_attention_shapes() -> None:
    stack = {
        "select_attention": [f"h1xd64 q{n} k{n}: sdpa" for n in range(8)],
        "build_sigmas": ["ays"],
        "wrap_denoiser": [],
    }
    assert cli.stack_summary(stack) == "attention: sdpa for all 8 shapes; schedule: ays; wrappers: none"
    mixed = {"select_attention": ["a: sage", "b: sage", "c: sdpa"]}
    assert cli.stack_summary(mixed) == "attention: sage for 2, sdpa for 1 of 3 shapes"


def test_progress_lines_reach_a_terminal_only(monkeypatch: pytest.MonkeyPatch) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    cli._status("composing")
    cli._status("ready", done=True)
    assert "composing ..." in terminal.getvalue() and terminal.getvalue().endswith("ready\n")
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    cli._status("composing")
    assert sys.stderr.getvalue() == ""


def test_plugins_filters_by_hook(env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plugins", "--json", "--hook", "build_sigmas"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert records and all("build_sigmas" in r["hooks"] for r in records)
    assert "schedules" in {r["name"] for r in records} and "sdpa" not in {r["name"] for r in records}


def test_generate_flags_left_out_keep_the_request_types_defaults() -> None:
    from diffstack.engine import GenerationRequest

    args = cli.build_parser().parse_args(["generate", "a red circle"])
    assert GenerationRequest(**cli.request_fields(args)) == GenerationRequest("a red circle")
    args = cli.build_parser().parse_args(["generate", "a", "--seed", "3", "--schedule", "karras"])
    assert cli.request_fields(args) == {"prompt": "a", "seeds": (3,), "num_images": 1, "schedule": "karras"}


def test_engine_commands_run_on_the_engine_workers_device_thread() -> None:
    import argparse
    import threading

    from diffstack.config import Settings

    seen: list[str] = []

    def command(args: argparse.Namespace, settings: Settings) -> int:
        seen.append(threading.current_thread().name)
        return 7

    assert cli.on_device(command)(argparse.Namespace(), Settings()) == 7
    assert seen == ["diffstack-engine"] and threading.current_thread().name != "diffstack-engine"


def test_a_wrapper_option_at_a_file_is_its_picture(tmp_path: Path) -> None:
    Image.new("RGB", (6, 4), (9, 99, 199)).save(tmp_path / "ref.png")
    (tmp_path / "junk.png").write_bytes(b"not a picture")
    args = cli.build_parser().parse_args(
        ["generate", "x", "--wrapper", f"reference:image=@{tmp_path / 'ref.png'},weight=0.5"]
    )
    options = cli.request_fields(args)["wrappers"]["reference"]
    assert options["weight"] == 0.5 and options["image"].size == (6, 4)
    assert options["image"].getpixel((0, 0)) == (9, 99, 199)
    args = cli.build_parser().parse_args(
        ["generate", "x", "--wrapper", f"reference:image=@{tmp_path / 'junk.png'}"]
    )
    with pytest.raises(cli.InvalidRequest) as error:
        cli.request_fields(args)
    assert [v.field for v in error.value.violations] == ["wrappers.reference.image"]


def test_a_plugin_sampler_name_parses_quietly_and_unknown_ones_do_not(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``--sampler`` knows the installed plugins' samplers (cfgpp's here) without logging their load."""
    args = cli.build_parser().parse_args(["generate", "a red circle", "--sampler", "euler_cfgpp"])
    assert args.sampler == "euler_cfgpp"
    assert capsys.readouterr().err == ""
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["generate", "a red circle", "--sampler", "euler_cfgppp"])
    assert "invalid choice: 'euler_cfgppp'" in capsys.readouterr().err
