"""The layers hold: every module imports on its own, and every plugin is under the import contracts.

The contracts themselves (compose ↛ engine, core ↛ server, client alone, plugins → ``diffstack``
only) live in the root pyproject.toml and run as ``lint-imports`` in scripts/test.sh.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [
    ROOT / "core/src",
    ROOT / "server/src",
    ROOT / "clients/python/src",
    ROOT / "serve-ray/src",
    *ROOT.glob("plugins/*/src"),
]


def _packages() -> list[Path]:
    return sorted(package.parent for src in SOURCES for package in src.glob("*/__init__.py"))


def _modules() -> list[str]:
    modules = []
    for package in _packages():
        for path in sorted(package.rglob("*.py")):
            parts = path.relative_to(package.parent).with_suffix("").parts
            if "_generated" in parts or parts[-1] == "__main__":
                continue
            modules.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return modules


def _contracts() -> dict[str, dict]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    return {"root": config, **{c["id"]: c for c in config["contracts"]}}


def test_every_package_and_plugin_is_under_the_contracts() -> None:
    contracts = _contracts()
    packages = {package.name for package in _packages()}
    plugins = {package.name for package in _packages() if package.parent.parent.parent.name == "plugins"}
    assert len(plugins) >= 12
    assert set(contracts["root"]["root_packages"]) == packages
    assert set(contracts["plugins-public-api"]["source_modules"]) == plugins
    assert set(contracts["plugins-independent"]["modules"]) == plugins


@pytest.mark.slow
def test_every_module_imports_on_its_own() -> None:
    """Each module is imported with none of the project's modules loaded before it: an import cycle
    that only works in one order (compose before engine, say) fails here. Third-party modules (torch)
    stay loaded between modules, which keeps this one process and a few seconds."""
    script = textwrap.dedent(
        """
        import importlib, sys, traceback
        ours = tuple(sys.argv[1].split(","))
        failures = []
        for name in sys.argv[2:]:
            for loaded in [m for m in sys.modules if m.split(".")[0] in ours]:
                del sys.modules[loaded]
            try:
                importlib.import_module(name)
            except Exception:
                failures.append(name + ": " + traceback.format_exc(limit=-1).strip().splitlines()[-1])
        print("\\n".join(failures))
        sys.exit(1 if failures else 0)
        """
    )
    roots = ",".join(package.name for package in _packages())
    modules = _modules()
    assert len(modules) > 60
    done = subprocess.run(
        [sys.executable, "-c", script, roots, *modules], capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]


def test_every_core_module_has_a_row_in_the_readme_table() -> None:
    """The README's module table is the map of the core: a new module is not done until it is on it."""
    readme = (ROOT / "README.md").read_text()
    core = ROOT / "core/src/diffstack"
    parts = [
        path.stem if path.suffix else path.name
        for path in core.iterdir()
        if (path.suffix == ".py" and path.stem != "__init__") or (path / "__init__.py").exists()
    ]
    modules = ["diffstack", *(f"diffstack.{part}" for part in sorted(parts))]
    missing = [module for module in modules if f"| `{module}` |" not in readme]
    assert not missing, f"not in README's module table: {missing}"
