"""``diffstack plugin new``: the written plugin installs by its entry point and passes the host's checks."""

from __future__ import annotations

import importlib.util
import tomllib
from pathlib import Path
from types import ModuleType

import pytest

from diffstack.cli import main
from diffstack.hookspecs import HOOK_NAMES
from diffstack.template import PLUGINS, check_name, plugin_source
from diffstack.testing import assert_offer_passes
from diffstack.types import Family

# The families each hook's template plugin is made for: its attention kernel serves UNets (transformers
# take a diffusers backend), its sigmas discrete-time models, channels-last convolutions.
FAMILIES = {hook: [Family.SD1] for hook in HOOK_NAMES} | {
    "encode_prompt": [Family.SD1, Family.FLUX],
    "wrap_denoiser": [Family.SD1, Family.FLUX],
}


def _import(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_hook_has_a_template() -> None:
    assert set(PLUGINS) == set(HOOK_NAMES)


@pytest.mark.parametrize("hook", HOOK_NAMES)
def test_plugin_new_writes_a_plugin_the_host_accepts(
    hook: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    name = f"my_{hook}"
    folder = tmp_path / "plugin"
    assert main(["plugin", "new", name, "--hook", hook, "--dir", str(folder)]) == 0
    assert "pip install -e" in capsys.readouterr().out
    project = tomllib.loads((folder / "pyproject.toml").read_text())
    assert project["project"]["entry-points"]["diffstack"] == {name: f"diffstack_{name}"}
    assert (folder / "tests" / f"test_{name}.py").read_text().count("assert_offer_passes") == 2
    module = _import(folder / "src" / f"diffstack_{name}" / "__init__.py", f"diffstack_{name}")
    for family in FAMILIES[hook]:
        assert assert_offer_passes(module, offer=name, family=family)


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
