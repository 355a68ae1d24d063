"""SIGTERM while a request runs: the request completes and the process exits 0; and the process exits
even when the engine's device thread is stuck in a plugin."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import grpc
import pytest

from diffstack.testing import BASELINE_PLUGINS
from diffstack_client import DiffstackClient, Finished, Progress, ServiceError
from diffstack_server.testing import WAIT_S

MODEL = "tiny-sd1"


def read_json_lines(stream: Any, into: queue.Queue[dict[str, Any]]) -> None:
    for line in stream:
        if line.startswith("{"):
            into.put(json.loads(line))


def wait_for_event(lines: queue.Queue[dict[str, Any]], name: str) -> dict[str, Any]:
    while True:
        entry = lines.get(timeout=WAIT_S * 2)  # generous: the child imports torch and diffusers
        if entry.get("event") == name:
            return entry


def test_sigterm_finishes_the_running_request_and_exits_0(models_dir: Path) -> None:
    environment = {
        **os.environ,
        "DIFFSTACK_PLUGINS__ALLOW": json.dumps(list(BASELINE_PLUGINS)),
        "DIFFSTACK_SERVER__GRACE_SECONDS": "30",
    }
    command = [sys.executable, "-m", "diffstack_server", "--port", "0", "--log-format", "json"]
    command += ["--models-dir", str(models_dir), "--model", MODEL]
    child = subprocess.Popen(
        command, env=environment, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
    )
    lines: queue.Queue[dict[str, Any]] = queue.Queue()
    threading.Thread(target=read_json_lines, args=(child.stderr, lines), daemon=True).start()
    try:
        port = wait_for_event(lines, "listening")["port"]
        wait_for_event(lines, "serving")
        with DiffstackClient(f"127.0.0.1:{port}", timeout=WAIT_S) as client:
            events = client.stream("one last picture", steps=30, seed=42)
            for event in events:
                if isinstance(event, Progress):
                    break
            child.send_signal(signal.SIGTERM)
            rest = list(events)
        assert isinstance(rest[-1], Finished), rest[-1]
        assert rest[-1].result.images[0].seed == 42
        assert child.wait(timeout=WAIT_S) == 0
        seen = set()
        while not lines.empty():
            seen.add(lines.get().get("event"))
        assert {"draining", "stopped"} <= seen
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


HANGING_SERVER = """
import importlib, sys
import diffstack.plugins
from diffstack.config import load_settings
from diffstack_server.app import serve

sys.path.insert(0, sys.argv[1])
# A plugin whose import never returns: it holds the import lock on the engine's device thread.
diffstack.plugins.load_plugins = lambda settings: importlib.import_module("hangs_on_import")
settings = load_settings(server={"port": 0, "log_format": "json", "grace_seconds": 1.0})
sys.exit(serve(settings))
"""


def test_sigterm_exits_even_when_a_plugin_never_returns(tmp_path: Path) -> None:
    (tmp_path / "hangs_on_import.py").write_text(
        "import sys, threading\n"
        'print(\'{"event": "plugin_hangs"}\', file=sys.stderr, flush=True)\n'
        "threading.Event().wait()\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", HANGING_SERVER, str(tmp_path)],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    lines: queue.Queue[dict[str, Any]] = queue.Queue()
    threading.Thread(target=read_json_lines, args=(child.stderr, lines), daemon=True).start()
    try:
        port = wait_for_event(lines, "listening")["port"]
        with DiffstackClient(f"127.0.0.1:{port}", timeout=WAIT_S) as client:
            with pytest.raises(ServiceError) as failure:
                client.plugins()  # the plugins are still loading: nothing to list yet, but an answer
            assert failure.value.code is grpc.StatusCode.UNAVAILABLE
        wait_for_event(lines, "plugin_hangs")  # the device thread is inside the plugin's import now
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=WAIT_S) == 0
        seen = []
        while not lines.empty():
            seen.append(lines.get().get("event"))
        assert "engine_thread_stuck_exiting" in seen, seen
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
