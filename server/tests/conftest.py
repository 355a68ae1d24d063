"""Fixtures for the server tests: a tiny real model, a real engine, and servers on free ports.

Every end-to-end test runs the real engine (baseline plugins only) on the tiny SD1-shaped model of the
shared ``models_dir`` (:mod:`diffstack.pytest_plugin`); :class:`diffstack_server.testing.SpyEngine`
observes and steers it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from diffstack.config import Settings
from diffstack.engine import Engine
from diffstack.plugins import load_plugins
from diffstack.testing import baseline_settings
from diffstack_client import DiffstackClient
from diffstack_server import BackgroundServer
from diffstack_server.testing import WAIT_S, SpyEngine

MODEL = "tiny-sd1"


@pytest.fixture(scope="module", autouse=True)
def logs_through_logging() -> Iterator[None]:
    """Send the server's structlog lines through stdlib logging, so pytest shows them with a failing
    test instead of printing lines of background threads between tests; restored after each module."""
    previous = structlog.get_config()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.KeyValueRenderer(key_order=["event"]),
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        cache_logger_on_first_use=False,
    )
    yield
    structlog.configure(**previous)


def make_settings(models_dir: Path, **sections: dict[str, Any]) -> Settings:
    """Settings for a test server: baseline plugins, the tiny model, free ports, no batching delay."""
    server = {
        "port": 0,
        "metrics_port": 0,
        "batch_wait_ms": 0,
        "preview_interval_s": 0.0,
        "batch_size": 4,  # fixed, not measured, and not warmed: tests count the engine's calls
        "warm_batches": False,
        **sections.pop("server", {}),
    }
    return baseline_settings(models_dir, MODEL, server=server, **sections)


@pytest.fixture(scope="session")
def settings_for(models_dir: Path) -> Callable[..., Settings]:
    return lambda **sections: make_settings(models_dir, **sections)


@pytest.fixture(scope="session")
def settings_at() -> Callable[..., Settings]:
    """``settings_at(models_dir, **sections)``: test settings for another models directory."""
    return make_settings


@pytest.fixture(scope="session")
def engine(models_dir: Path) -> Engine:
    """One real engine for the session (servers come and go around it)."""
    settings = make_settings(models_dir)
    return Engine.start(settings, load_plugins(settings.plugins))


@pytest.fixture
def spy(engine: Engine) -> SpyEngine:
    return SpyEngine(engine)


# -------------------------------------------------------------------------------------------------
# Servers and clients
# -------------------------------------------------------------------------------------------------


@pytest.fixture
def start_server(settings_for: Callable[..., Settings]) -> Iterator[Callable[..., BackgroundServer]]:
    """``start_server(engine, server={...}, ...)``: a started server on a free port, stopped after."""
    servers: list[BackgroundServer] = []

    def start(engine: Any = None, ready: bool = True, **sections: dict[str, Any]) -> BackgroundServer:
        server = BackgroundServer(settings_for(**sections), engine)
        servers.append(server)
        return server.start(ready_timeout=WAIT_S if ready else None)

    yield start
    for server in servers:
        server.stop(grace=0)


@pytest.fixture
def server(start_server: Callable[..., BackgroundServer], spy: SpyEngine) -> BackgroundServer:
    """A started server around the spied real engine (queue 8, batches of up to 4 images)."""
    return start_server(spy, server={"queue_size": 8, "max_batch": 4})


@pytest.fixture
def client(server: BackgroundServer) -> Iterator[DiffstackClient]:
    with DiffstackClient(server.target, timeout=WAIT_S) as client:
        yield client
