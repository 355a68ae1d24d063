"""diffstack's pytest plugin: the tiny models every test suite shares.

The workspace loads it from its root ``conftest.py``, so the core, server, plugin and cross-package
tests all use one session fixture (the models are built once per run). A plugin's own repository can
load it too: ``pytest_plugins = ["diffstack.pytest_plugin"]`` in its root conftest.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from diffstack.testing import save_tiny_model
from diffstack.types import Family

TINY_CARD = {"weights": "random", "default_width": 64, "default_height": 64, "default_steps": 4}
"""The model card every tiny model carries: 64×64 pictures in 4 steps by default, random weights."""


def tiny_model_name(family: Family) -> str:
    """The folder (and so the model name) of ``family``'s tiny model inside ``models_dir``."""
    return f"tiny-{family.value}"


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny model per family (``tiny-sd1``, ``tiny-sd2``, ``tiny-sdxl``, ``tiny-flux``), saved as
    diffusers folders of safetensors with :data:`TINY_CARD`, built once per test session."""
    root = tmp_path_factory.mktemp("models")
    for family in Family:
        save_tiny_model(family, root / tiny_model_name(family), metadata=TINY_CARD)
    return root


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that needs the tiny models runs a real engine: it is ``slow`` without having to say so."""
    for item in items:
        if "models_dir" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
