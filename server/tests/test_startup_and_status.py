"""What an admin sees of a running server: the stack decisions at start-up, metrics by default, and
``diffstack status`` through the Python client."""

from __future__ import annotations

import json
import logging
import socket
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest

from diffstack.cli import build_parser, main, settings_from_args
from diffstack_client import CandidateStatus, DiffstackClient, PluginStatus, StackReport
from diffstack_server import BackgroundServer


def test_start_up_logs_every_stack_decision_with_its_reason(
    start_server: Callable[..., BackgroundServer], spy: Any, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO):
        start_server(spy)
    slots = [r.getMessage() for r in caplog.records if "event='stack slot'" in r.getMessage()]
    assert len(slots) == 7  # compile_vae beside compile_model
    attention = next(line for line in slots if "slot='select_attention'" in line)
    assert (
        "'status': 'chosen'" in attention and "'plugin': 'sdpa'" in attention and "'scope': 'h" in attention
    )
    sigmas = next(line for line in slots if "slot='build_sigmas'" in line)
    assert "'reason': " in sigmas


def test_metrics_are_served_by_default_and_a_busy_port_does_not_stop_serving(
    start_server: Callable[..., BackgroundServer], spy: Any, caplog: pytest.LogCaptureFixture
) -> None:
    assert settings_from_args(build_parser().parse_args(["serve"])).server.metrics
    assert settings_from_args(build_parser().parse_args(["serve"])).server.metrics_port == 9464
    assert not settings_from_args(build_parser().parse_args(["serve", "--no-metrics"])).server.metrics

    server = start_server(spy)
    port = server.server.metrics_port
    assert port
    assert (
        "diffstack_queue_depth"
        in urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    )

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with caplog.at_level(logging.INFO):
            second = start_server(spy, server={"metrics_port": busy.getsockname()[1]})
        assert second.server.metrics_port is None
        assert any("metrics unavailable" in r.getMessage() for r in caplog.records)
        with DiffstackClient(second.target, timeout=30) as client:
            assert client.health() == "SERVING"

    off = start_server(spy, server={"metrics": False})
    assert off.server.metrics_port is None


def test_the_client_returns_typed_reports(start_server: Callable[..., BackgroundServer], spy: Any) -> None:
    server = start_server(spy)
    with DiffstackClient(server.target, timeout=30) as client:
        plugins = {p.name: p for p in client.plugins()}
        stack = client.stack()
    assert plugins["sdpa"].status is PluginStatus.LOADED and plugins["sdpa"].status == "loaded"
    assert plugins["sdpa"].hooks == ("select_attention",)
    assert isinstance(stack, StackReport)
    attention = stack.slot("select_attention")
    assert {c.status for c in attention.candidates} == {CandidateStatus.CHOSEN}
    assert all(c.time_ms is None for c in attention.candidates)  # not measured on a CPU: None, not 0.0
    assert stack.summary()["build_sigmas"] == ("default",)
    assert all(isinstance(c.notes, tuple) for s in stack.slots for c in s.candidates)


def test_status_shows_health_stack_and_stats(
    start_server: Callable[..., BackgroundServer], spy: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    server = start_server(spy)
    with DiffstackClient(server.target, timeout=30) as client:
        client.generate("a red circle", steps=1)
    assert main(["status", "--target", server.target]) == 0
    out = capsys.readouterr().out
    assert f"{server.target}: SERVING" in out
    assert "stack: attention: sdpa for all" in out
    assert "served 1 requests (1 images), 0 failed" in out
    assert main(["status", "--target", server.target, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["health"] == "SERVING" and data["stack"]["model"] == "tiny-sd1"


def test_status_of_an_unreachable_target_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        target = f"127.0.0.1:{closed.getsockname()[1]}"
    assert main(["status", "--target", target, "--timeout", "3"]) == 1
    # Other tests' background servers may log to stderr too: the command's own output is one line.
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert line.startswith(f"error: {target}: UNAVAILABLE: ")
