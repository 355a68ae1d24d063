"""``diffstack plugin new``: the written plugin installs by its entry point and passes the host's checks."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path
from types import ModuleType

import pytest

from diffstack.cli import main
from diffstack.hookspecs import HOOK_NAMES
from diffstack.template import PLUGINS, check_name, plugin_source
from diffstack.testing import assert_offer_passes


def test_every_hook_has_a_template() -> None:
    assert set(PLUGINS) == set(HOOK_NAMES)


@pytest.mark.slow
def test_plugin_new_writes_plugins_whose_own_tests_pass(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One plugin per hook, each with its own test run as its author would, in a fresh interpreter:
    the test loads the plugin alone into a host and composes a tiny model through the host's checks."""
    folders = []
    for hook in HOOK_NAMES:
        name = f"my_{hook}"
        folder = tmp_path / name
        assert main(["plugin", "new", name, "--hook", hook, "--dir", str(folder)]) == 0
        assert "pip install -e" in capsys.readouterr().out
        project = tomllib.loads((folder / "pyproject.toml").read_text())
        assert project["project"]["entry-points"]["diffstack"] == {name: f"diffstack_{name}"}
        folders.append(folder)
    finished = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            *(str(f / "tests") for f in folders),
        ],
        env={**os.environ, "PYTHONPATH": os.pathsep.join(str(f / "src") for f in folders)},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    assert f"{len(HOOK_NAMES)} passed" in finished.stdout


def test_plugin_new_refuses_bad_names_and_existing_folders(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["plugin", "new", "My-Plugin", "--hook", "build_sigmas", "--dir", str(tmp_path / "a")]) == 2
    assert "use 2-40 lower case letters" in capsys.readouterr().err
    assert main(["plugin", "new", "ok", "--hook", "build_sigmas", "--dir", str(tmp_path)]) == 2
    assert "exists already" in capsys.readouterr().err
    check_name("my_attention2")


def test_assert_offer_passes_reports_the_hosts_reason() -> None:
    module = ModuleType("diffstack_broken_sigmas")
    source = plugin_source("broken_sigmas", "build_sigmas").replace("0.0]", "1.0]")  # no longer ends in 0
    exec(compile(source, module.__name__, "exec"), module.__dict__)
    with pytest.raises(AssertionError, match="rejected: sigmas must descend strictly and end in 0"):
        assert_offer_passes(module, offer="broken_sigmas")
