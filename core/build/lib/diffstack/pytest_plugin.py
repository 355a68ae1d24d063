"""diffstack's pytest plugin: the tiny models every test suite shares.

The workspace loads it from its root ``conftest.py``, so the core, server, plugin and cross-package
tests all use one session fixture (the models are built once per run). A plugin's own repository can
load it too: ``pytest_plugins = ["diffstack.pytest_plugin"]`` in its root conftest.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

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


@pytest.fixture(autouse=True)
def process_state_restored() -> Iterator[None]:
    """Each test gets the process back as it found it: environment, structlog, stdlib loggers.

    The CLI configures the process the way a command should (library verbosity through the
    environment, logger levels, structlog's filter level), and tests run it in-process; without this
    a later test would capture no info events, or hand a subprocess a muted environment.
    """
    environ = dict(os.environ)
    config = structlog.get_config()
    loggers = [
        logging.getLogger(),
        *(logging.getLogger(name) for name in list(logging.root.manager.loggerDict)),
    ]
    saved = [(logger, logger.level, logger.propagate, list(logger.handlers)) for logger in loggers]
    capturing_warnings = logging._warnings_showwarning is not None  # type: ignore[attr-defined]
    yield
    os.environ.clear()
    os.environ.update(environ)
    structlog.configure(**config)
    for logger, level, propagate, handlers in saved:
        logger.setLevel(level)
        logger.propagate = propagate
        logger.handlers[:] = handlers
    logging.captureWarnings(capturing_warnings)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that needs the tiny models runs a real engine: it is ``slow`` without having to say so."""
    for item in items:
        if "models_dir" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
