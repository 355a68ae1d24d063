"""SIGTERM while a request runs: the request completes and the process exits 0."""

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

from diffstack.testing import BASELINE_PLUGINS
from diffstack_client import DiffstackClient, Finished, Progress
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
