"""Named profiles: built-in and ``[profiles.NAME]`` ones, ``--profile``, ``diffstack profiles``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from diffstack.cli import main
from diffstack.config import load_settings
from diffstack.errors import FieldViolation, InvalidRequest
from diffstack.profiles import BUILTIN_PROFILES, Profile, all_profiles, apply_profile, blame_profile
from diffstack.testing import BASELINE_PLUGINS

SPEED = BUILTIN_PROFILES["speed"]


def test_the_reference_configurations_are_built_in() -> None:
    assert set(BUILTIN_PROFILES) == {"speed", "balanced", "quality", "production"}
    assert SPEED.request_defaults() == {
        "steps": 10,
        "sampler": "euler",
        "schedule": "ays",
        "wrappers": {"deepcache": {"interval": 2}},
    }


def test_explicit_fields_override_the_profile_and_keep_its_other_defaults() -> None:
    fields = apply_profile(
        {"steps": 4, "wrappers": {"deepcache": {"interval": 5}}}, "speed", BUILTIN_PROFILES
    )
    assert fields == {
        "steps": 4,
        "sampler": "euler",
        "schedule": "ays",
        "wrappers": {"deepcache": {"interval": 5}},
    }
    extra = apply_profile({"wrappers": {"multiscale": {}}}, "speed", BUILTIN_PROFILES)
    assert extra["wrappers"] == {"deepcache": {"interval": 2}, "multiscale": {}}
    assert apply_profile({"steps": 3}, "", BUILTIN_PROFILES) == {"steps": 3}


def test_an_unknown_profile_is_refused_on_the_profile_field() -> None:
    with pytest.raises(InvalidRequest) as caught:
        apply_profile({}, "fastest", BUILTIN_PROFILES)
    (violation,) = caught.value.violations
    assert violation.field == "profile"
    assert "fastest" in violation.description and "balanced" in violation.description


def test_a_refused_setting_is_blamed_on_the_profile_only_where_the_profile_set_it() -> None:
    error = InvalidRequest(
        [
            FieldViolation("wrappers.deepcache", "no such wrapper"),
            FieldViolation("width", "not a multiple of 8"),
        ]
    )
    blamed = blame_profile(error, "speed", {"width": 63})
    assert [v.field for v in blamed.violations] == ["profile", "width"]
    assert "wrappers.deepcache" in blamed.violations[0].description
    asked = blame_profile(error, "speed", {"wrappers": {"deepcache": {}}})
    assert asked.violations[0].field == "wrappers.deepcache"


def test_profiles_in_the_toml_join_and_replace_the_built_in_ones(tmp_path: Path) -> None:
    config = tmp_path / "s.toml"
    config.write_text(
        '[engine]\nprofile = "mine"\n'
        "[profiles.mine]\nsteps = 3\nwrappers = { deepcache = { interval = 4 } }\n"
        "[profiles.speed]\nsteps = 6\n"
    )
    settings = load_settings(config)
    known = all_profiles(settings.profiles)
    assert known["mine"] == Profile(steps=3, wrappers={"deepcache": {"interval": 4}})
    assert known["speed"] == Profile(steps=6)
    assert known["balanced"] == BUILTIN_PROFILES["balanced"]


def test_a_malformed_or_unknown_profile_setting_is_refused_at_load(tmp_path: Path) -> None:
    config = tmp_path / "s.toml"
    config.write_text("[profiles.bad]\nsteps = 0\n")
    with pytest.raises(ValueError, match="steps"):
        load_settings(config)
    with pytest.raises(ValueError, match=r"engine\.profile"):
        load_settings(None, engine={"profile": "nope"})


def test_profiles_command_lists_each_profile_with_what_it_sets(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "s.toml"
    config.write_text('[profiles.tiny]\ndescription = "two steps"\nsteps = 2\n')
    assert main(["profiles", "--config", str(config), "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows["tiny"] == {
        "name": "tiny",
        "builtin": False,
        "description": "two steps",
        "sets": {"steps": 2},
    }
    assert rows["speed"]["builtin"] is True
    assert rows["speed"]["sets"]["wrappers"] == {"deepcache": {"interval": 2}}
    assert main(["--config", str(config), "profiles"]) == 0
    table = capsys.readouterr().out
    assert "wrapper=deepcache:interval=2" in table and "tiny" in table and "two steps" in table


@pytest.fixture
def env(models_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DIFFSTACK_PLUGINS__ALLOW", json.dumps(list(BASELINE_PLUGINS)))
    monkeypatch.setenv("DIFFSTACK_ENGINE__DEFAULT_MODEL", "tiny-sd1")
    return models_dir


def test_generate_with_a_profile_from_the_settings(
    env: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "s.toml"
    config.write_text('[profiles.two]\nsteps = 2\nschedule = "karras"\n')
    out = tmp_path / "o.png"
    args = ["--models-dir", str(env), "--profile", "two", "generate", "a red circle", "-o", str(out)]
    assert main([*args, "--config", str(config), "--seed", "1"]) == 0
    assert Image.open(out).size == (64, 64)
    assert "karras" in capsys.readouterr().err


def test_a_profile_cannot_enable_what_the_admin_left_out(
    env: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # BASELINE_PLUGINS leaves DeepCache out, as an admin's plugins.allow would.
    assert "deepcache" not in BASELINE_PLUGINS
    out = tmp_path / "o.png"
    code = main(["--models-dir", str(env), "generate", "a red circle", "-o", str(out), "--profile", "speed"])
    assert code == 2
    err = capsys.readouterr().err
    assert "error: profile: profile 'speed' sets wrappers, refused: no installed plugin" in err
    assert "a wrapper named 'deepcache'" in err
    assert "error: profile: profile 'speed' sets schedule" in err
    assert not out.exists()
