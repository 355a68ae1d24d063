"""Shared fixtures: tiny models of each family saved to disk, and engines that load them for real."""

from __future__ import annotations

from pathlib import Path

import pytest

from diffstack.engine import Engine
from diffstack.plugins import load_plugins
from diffstack.testing import baseline_settings, save_tiny_model
from diffstack.types import Family


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny model per family, saved as diffusers folders of safetensors."""
    root = tmp_path_factory.mktemp("models")
    card = {"weights": "random", "default_width": 64, "default_height": 64, "default_steps": 4}
    for family in Family:
        save_tiny_model(family, root / f"tiny-{family.value}", metadata=card)
    return root


@pytest.fixture(scope="session")
def engine(models_dir: Path) -> Engine:
    """An engine with the baseline plugins and the tiny SD1 model as its default."""
    settings = baseline_settings(models_dir)
    return Engine.start(settings, load_plugins(settings.plugins))
