"""Engines that load the tiny models (``models_dir``, from :mod:`diffstack.pytest_plugin`) for real."""

from __future__ import annotations

from pathlib import Path

import pytest

from diffstack.engine import Engine
from diffstack.plugins import load_plugins
from diffstack.testing import baseline_settings


@pytest.fixture(scope="session")
def engine(models_dir: Path) -> Engine:
    """An engine with the baseline plugins and the tiny SD1 model as its default."""
    settings = baseline_settings(models_dir)
    return Engine.start(settings, load_plugins(settings.plugins))
